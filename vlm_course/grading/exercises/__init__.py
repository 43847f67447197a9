"""One module per lesson, named lNN_<slug>.py; each registers its exercises when imported (see ../README.md)."""
