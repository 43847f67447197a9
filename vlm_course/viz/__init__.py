"""Plots and widgets for the lessons, one file per lesson (named as the graded exercises are).

Every plotting function draws one figure and shows it (`show=True`, the notebook default), or returns the
matplotlib Figure without showing it (`show=False`: tests, saving to a file). Widgets fall back to a static
figure when there is no live Jupyter kernel (a script, nbconvert to HTML, a viewer on GitHub).

Images may be given as a PIL image, a path, an (H, W, 3) array, or a (3, H, W) tensor; normalised tensors
are mapped back to [0, 1] with `mean`/`std` (SigLIP's are 0.5 and 0.5).

    common.py            in_live_kernel, to_image_array, showing or returning a figure
    l01_vit_patching.py  ... l09_reading_and_pointing.py: each lesson's plots. A new lesson adds its own file here.

Everything is importable from here (`from vlm_course.viz import show_patch_grid`).
"""

from .common import in_live_kernel, to_image_array
from .l01_vit_patching import (
    attention_explorer,
    patch_explorer,
    plot_attention_map,
    plot_attention_maps,
    plot_patch_sequence,
    plot_position_similarity,
    show_patch,
    show_patch_grid,
)
from .l02_projector import plot_pixel_shuffle, plot_tokens_vs_resolution
from .l03_decoder import (
    plot_activations,
    plot_causal_gqa,
    plot_kv_cache_memory,
    plot_rope_scores,
    plot_rope_tables,
    plot_sampling,
)
from .l04_assembling import plot_embedding_rms, plot_token_sequence
from .l05_training import plot_loss_curves, plot_nf4_levels, plot_token_labels, show_rows
from .l06_evaluation import plot_anls_curve, plot_vqa_credit
from .l07_deployment import plot_decode_roofline, plot_memory_budget
from .l08_design_space import plot_design_accuracy, plot_design_costs, plot_design_results
from .l09_reading_and_pointing import plot_boxes, plot_reading_results, plot_resolutions

__all__ = [
    "attention_explorer", "in_live_kernel", "patch_explorer", "plot_activations", "plot_anls_curve",
    "plot_attention_map", "plot_attention_maps", "plot_causal_gqa", "plot_decode_roofline", "plot_design_accuracy",
    "plot_design_costs", "plot_design_results", "plot_embedding_rms",
    "plot_kv_cache_memory", "plot_loss_curves", "plot_memory_budget", "plot_nf4_levels", "plot_patch_sequence",
    "plot_pixel_shuffle", "plot_position_similarity", "plot_rope_scores", "plot_rope_tables", "plot_sampling",
    "plot_token_labels", "plot_token_sequence", "plot_tokens_vs_resolution", "plot_vqa_credit", "show_patch",
    "show_patch_grid", "show_rows", "to_image_array", "plot_boxes", "plot_reading_results", "plot_resolutions",
]
