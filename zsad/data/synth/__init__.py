"""SynthAD: the procedural defect world that zsad-tiny is trained on and every offline test runs on.

design.md, "The embedded default world": no pretrained CLIP weights exist here, so the project renders its own
anomaly-detection dataset. Every image is a pure function of a seed, vectorised numpy with PIL only for lines.

How an image is made (:func:`draw_scene`, then optionally :func:`apply_defect`):

* a *scene* holds the surface colour ``base`` (texture painters fill the frame; object painters draw a shaded
  object from a signed distance function over a background with a soft shadow), a multiplicative ``light``
  field (gain, directional gradient, vignette) and additive sensor ``noise``;
* the image is ``quantise(base * light + noise)``;
* a defect only rewrites ``base`` inside its own region (``base' = base + alpha (target - base)``, clipped to
  the object), then the same light and noise are applied. Pixels outside the region are therefore
  byte-identical to the clean image, and the ground-truth mask is *defined* as the set of pixels whose
  bytes changed: it is exact by construction, and a test can check it.

Geometry is in frame units (the image is the unit square), so ``size`` can be anything; defect sizes are
multiples of the scene's characteristic radius (half the frame for textures, the object's radius for
objects), because in the throwaway prototype defects sized in pixels were too small on objects. Line widths
scale with ``size`` but never drop below 2 px. A defect attempt whose change is too faint
(:data:`MIN_MEAN_CHANGE`) or too small is redrawn. Normal images vary in colour, orientation, pattern scale,
lighting and noise, so "normal vs defective" cannot be told apart by global colour.

Seeds: :func:`generate` draws image ``i`` of (category, split, defect) from
``np.random.default_rng([seed, CATEGORIES.index(category), split, defect_index, i])``, so a subset of
categories renders the same images for the categories it keeps.

Modules, each one seam of the generator: :mod:`.catalogue` (categories, defects, colours),
:mod:`.canvas` (drawing helpers), :mod:`.textures` and :mod:`.objects` (painters), :mod:`.scene`,
:mod:`.defects`, :mod:`.render` (one image, training batches), :mod:`.captions`, :mod:`.writer` (the
MVTec-layout tree and its cache) and :mod:`.sheet` (contact sheet).
"""

from __future__ import annotations

from zsad.data.synth.captions import (
    ABNORMAL_STATES,
    ABNORMAL_SUFFIXES,
    CAPTION_TEMPLATES,
    DEFECT_STATES,
    NEGATED_SUFFIXES,
    NORMAL_STATES,
    NORMAL_SUFFIXES,
    caption,
    fix_articles,
)
from zsad.data.synth.catalogue import (
    CATEGORIES,
    CATEGORY_PHRASES,
    COLORS,
    DEFECTS,
    MIN_MEAN_CHANGE,
    OBJECTS,
    SYNTH_VERSION,
    TEXTURES,
)
from zsad.data.synth.defects import apply_defect
from zsad.data.synth.render import render, resize_image, resize_mask, sample_batch
from zsad.data.synth.scene import Scene, draw_scene
from zsad.data.synth.sheet import contact_sheet
from zsad.data.synth.writer import CONFIG_NAME, ensure, generate, image_seed

__all__ = [
    "ABNORMAL_STATES",
    "ABNORMAL_SUFFIXES",
    "CAPTION_TEMPLATES",
    "CATEGORIES",
    "CATEGORY_PHRASES",
    "COLORS",
    "CONFIG_NAME",
    "DEFECTS",
    "DEFECT_STATES",
    "MIN_MEAN_CHANGE",
    "NEGATED_SUFFIXES",
    "NORMAL_STATES",
    "NORMAL_SUFFIXES",
    "OBJECTS",
    "SYNTH_VERSION",
    "Scene",
    "TEXTURES",
    "apply_defect",
    "caption",
    "contact_sheet",
    "draw_scene",
    "ensure",
    "fix_articles",
    "generate",
    "image_seed",
    "render",
    "resize_image",
    "resize_mask",
    "sample_batch",
]
