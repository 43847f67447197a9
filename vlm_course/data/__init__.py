"""Data for the course: the_cauldron loader and the synthetic mini-cauldron (the collator lives in collate.py)."""

from vlm_course.data.cauldron import LoadReport, load_cauldron, load_mini_cauldron

__all__ = ["SUBSETS", "LoadReport", "gallery", "generate", "generate_mix", "load_cauldron", "load_mini_cauldron"]
_SYNTHETIC = ("SUBSETS", "gallery", "generate", "generate_mix")


def __getattr__(name):
    # synthetic is imported on first use, not here: `python -m vlm_course.data.synthetic` would otherwise
    # find the module already imported by this package and warn that it runs twice.
    if name in _SYNTHETIC:
        from vlm_course.data import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module 'vlm_course.data' has no attribute {name!r}")
