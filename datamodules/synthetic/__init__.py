"""The synthetic screen: planted gene modules rendered as Cell Painting-like sites with batch
effects, written as shards + manifest + ground truth (`phenoscale synth`, docs/synthetic.md)."""

from datamodules.synthetic.design import PRESETS, ScreenConfig, ScreenDesign, design_screen, preset
from datamodules.synthetic.realism import in_cell_stain_correlation
from datamodules.synthetic.render import AXES, CHANNELS, Optics, render_site
from datamodules.synthetic.screen import SCREEN_JSON, render_sites, write_screen
from datamodules.synthetic.truth import Truth, read_truth, write_truth

__all__ = [
    "AXES",
    "CHANNELS",
    "PRESETS",
    "SCREEN_JSON",
    "Optics",
    "ScreenConfig",
    "ScreenDesign",
    "Truth",
    "design_screen",
    "in_cell_stain_correlation",
    "preset",
    "read_truth",
    "render_site",
    "render_sites",
    "write_screen",
    "write_truth",
]
