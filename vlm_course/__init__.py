"""vlm_course: the companion library of "Build a vision-language model from scratch".

One concept per module, data flowing one way:
image -> processing -> vision -> projector -> vlm (splice) -> decoder -> logits -> loss / generate.
"""

__version__ = "0.1.0"
