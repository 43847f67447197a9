"""`python -m vlm_course.evaluation` is `python -m vlm_course eval`."""

import sys

from .cli import eval_main

sys.exit(eval_main())
