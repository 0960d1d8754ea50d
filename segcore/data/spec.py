"""``dataset.yaml``: what a dataset folder means (classes, mask colours, pairing, normalisation).

A dataset is a folder ``images/`` + ``masks/`` + optional ``dataset.yaml``::

    classes: [pore, quartz, albite, clay]   # class ids 0..K-1 in this order
    mask_mode: rgb                          # ids (class-id masks, default) | rgb (colour-coded)
    colors:                                 # rgb only: one or several colours per class
      pore: [[0, 0, 0]]
      quartz: [[255, 0, 0], [250, 5, 0]]    # several QEMSCAN minerals merged into one class
      albite: [0, 255, 0]                   # a single colour may be written flat
      clay: [[0, 0, 255], [255, 255, 0]]
    ignore_colors: [[255, 255, 255]]        # rgb only: colours that become 255 (ignore)
    id_map: {255: 1}                        # ids only: remap raw values first (0/255 binary masks)
    pairing:                                # only when image and mask names differ
      image_regex: 'scan_(?P<key>\\d+)'     # full match on the image file stem
      mask_template: 'label_{key}'          # mask stem from the named groups, or instead:
      # mask_regex: 'label_(?P<key>\\d+)'   # masks whose named groups equal the image's
    normalize: {mode: percentile, low_percentile: 0.5, high_percentile: 99.5}
    mask_scale: 18.72                       # masks are coarser: image px per mask px (default: same size)
    # pixel_size_um: {image: 0.5, mask: 9.36}   # or the same from pixel sizes (mask_scale = 9.36 / 0.5)
    boundary_ignore: 2                      # ignore (255) pixels within 2 model px of a label boundary

``classes`` / ``colors`` may also be spelled ``class_names`` / ``class_colors``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from segcore.config import NormalizeConfig, format_validation_error
from segcore.data.errors import DataError
from segcore.data.io import is_supported, read_image

log = logging.getLogger(__name__)

SPEC_FILE = "dataset.yaml"
IGNORE = 255
RGB = tuple[int, int, int]


def _as_color_list(value: Any) -> Any:
    """Accept ``[r, g, b]`` as well as ``[[r, g, b], ...]``."""
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) for v in value):
        return [value]
    return value


def _check_rgb(colors: list[RGB]) -> list[RGB]:
    for c in colors:
        if not all(0 <= v <= 255 for v in c):
            raise ValueError(f"colour {list(c)} has a component outside 0..255")
    return colors


class PairingSpec(BaseModel):
    """How an image file finds its mask when their names differ (default: same stem)."""

    model_config = ConfigDict(extra="forbid")

    image_regex: str | None = None
    mask_template: str | None = None
    mask_regex: str | None = None

    @model_validator(mode="after")
    def _check(self) -> PairingSpec:
        groups: set[str] = set()
        for name in ("image_regex", "mask_regex"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    compiled = re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"{name} {pattern!r} is not a valid regex: {err}") from None
                if not compiled.groupindex:
                    raise ValueError(f"{name} {pattern!r} needs a named group such as (?P<key>\\d+)")
                if name == "image_regex":
                    groups = set(compiled.groupindex)
        if self.mask_template is not None and self.mask_regex is not None:
            raise ValueError("give mask_template or mask_regex, not both")
        if (self.mask_template or self.mask_regex) and self.image_regex is None:
            raise ValueError("mask_template / mask_regex need image_regex")
        if self.mask_template is not None:
            used = {f for f in re.findall(r"{(\w+)}", self.mask_template)}
            if not used <= groups:
                raise ValueError(f"mask_template uses {sorted(used - groups)}, not named groups of image_regex")
        if self.mask_regex is not None and set(re.compile(self.mask_regex).groupindex) != groups:
            raise ValueError("mask_regex must have the same named groups as image_regex")
        return self

    def match_image(self, image_stem: str) -> dict[str, str] | None:
        """Named groups of ``image_regex`` on ``image_stem`` (``{"stem": stem}`` without a regex);
        None when the stem does not match."""
        if self.image_regex is None:
            return {"stem": image_stem}
        m = re.fullmatch(self.image_regex, image_stem)
        return m.groupdict() if m else None


class PixelSizes(BaseModel):
    """Pixel sizes in micrometres of the images and of their masks."""

    model_config = ConfigDict(extra="forbid")

    image: float = Field(gt=0)
    mask: float = Field(gt=0)


class DatasetSpec(BaseModel):
    """Parsed ``dataset.yaml``; unknown keys are errors so typos name themselves."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    class_names: list[str] = Field(default_factory=list, alias="classes")
    mask_mode: Literal["ids", "rgb"] = "ids"
    class_colors: dict[str, list[RGB]] = Field(default_factory=dict, alias="colors")
    ignore_colors: list[RGB] = Field(default_factory=list)
    id_map: dict[int, int] = Field(default_factory=dict)
    pairing: PairingSpec = Field(default_factory=PairingSpec)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    mask_scale: float | None = Field(None, gt=0)
    pixel_size_um: PixelSizes | None = None
    boundary_ignore: int = Field(0, ge=0)
    description: str = ""

    @field_validator("class_colors", mode="before")
    @classmethod
    def _flat_colors(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: _as_color_list(v) for k, v in value.items()}
        return value

    @field_validator("ignore_colors", mode="before")
    @classmethod
    def _flat_ignore(cls, value: Any) -> Any:
        return _as_color_list(value)

    @model_validator(mode="after")
    def _check(self) -> DatasetSpec:
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"classes has duplicates: {self.class_names}")
        for colors in [*self.class_colors.values(), self.ignore_colors]:
            _check_rgb(colors)
        if self.mask_scale is not None and self.pixel_size_um is not None:
            raise ValueError("give mask_scale or pixel_size_um, not both")
        if self.mask_mode == "rgb":
            if not self.class_colors:
                raise ValueError("mask_mode rgb needs colors: {class_name: [[r, g, b], ...]}")
            if not self.class_names:
                self.class_names = list(self.class_colors)
            unknown = [k for k in self.class_colors if k not in self.class_names]
            if unknown:
                raise ValueError(f"colors names classes {unknown} that are not in classes {self.class_names}")
            self._check_colour_clashes()
        return self

    def _check_colour_clashes(self) -> None:
        seen: dict[RGB, str] = {}
        for name, colors in [*self.class_colors.items(), ("<ignore>", self.ignore_colors)]:
            for c in colors:
                c = tuple(c)
                if c in seen and seen[c] != name:
                    raise ValueError(f"colour {list(c)} is given to both {seen[c]} and {name}")
                seen[c] = name

    @property
    def declared_mask_scale(self) -> float | None:
        """Image px per mask px from ``mask_scale`` or ``pixel_size_um``; None when not declared."""
        if self.mask_scale is not None:
            return float(self.mask_scale)
        if self.pixel_size_um is not None:
            return self.pixel_size_um.mask / self.pixel_size_um.image
        return None

    def mask_scale_for(self, image_shape: tuple[int, int], mask_shape: tuple[int, int],
                       source: str | Path) -> float:
        """The image-px-per-mask-px ratio of one image/mask pair (1.0 for equal sizes).

        A mask must cover the image's extent: with a declared scale ``s`` each side is
        ``image / s`` give or take one mask pixel (rounding). Anything else is a DataError that
        names both sizes and the dataset.yaml key to set.
        """
        (h, w), (mh, mw) = (tuple(int(v) for v in image_shape[:2]), tuple(int(v) for v in mask_shape[:2]))
        scale = self.declared_mask_scale
        if scale is None:
            if (mh, mw) == (h, w):
                return 1.0
            ratio = f"{h / mh:.4g}" if mh else "?"
            raise DataError(source, f"image is {h}x{w} (HxW) but its mask is {mh}x{mw}",
                            f"the mask must have the image's height and width, or, for coarser labels, set "
                            f"mask_scale: {ratio} (image px per mask px) or pixel_size_um in {SPEC_FILE}")
        if abs(mh - h / scale) <= 1 and abs(mw - w / scale) <= 1:
            return scale
        key = "mask_scale" if self.mask_scale is not None else "pixel_size_um (mask_scale)"
        raise DataError(source, f"image is {h}x{w} (HxW) but its mask is {mh}x{mw}, which does not fit "
                        f"{key} {scale:.4g} (expected {h / scale:.1f}x{w / scale:.1f} +- 1)",
                        f"fix {key} in {SPEC_FILE} (this pair has {h / max(mh, 1):.4g} image px per mask px) "
                        "or the mask")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def color_lut(self) -> dict[int, int]:
        """Packed colour ``r << 16 | g << 8 | b`` -> class id (255 for ignore colours)."""
        lut = {_pack(c): IGNORE for c in self.ignore_colors}
        for name, colors in self.class_colors.items():
            cid = self.class_names.index(name)
            lut.update({_pack(c): cid for c in colors})
        return lut

    def display_colors(self) -> list[RGB] | None:
        """One colour per class for overlays: its first palette colour (None without colours;
        a class without colours gets grey)."""
        if not self.class_colors:
            return None
        return [tuple(self.class_colors[n][0]) if self.class_colors.get(n) else (128, 128, 128)
                for n in self.class_names]

    def to_yaml(self) -> str:
        """YAML text using the short keys (``classes``, ``colors``)."""
        data = self.model_dump(by_alias=True, exclude_defaults=True, mode="json")
        if "classes" not in data and self.class_names:
            data["classes"] = list(self.class_names)
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def _pack(c: RGB) -> int:
    return (int(c[0]) << 16) | (int(c[1]) << 8) | int(c[2])


def parse_spec(data: dict[str, Any] | None, source: str | Path = "<dict>") -> DatasetSpec:
    """Validate a dict (e.g. loaded YAML) into a :class:`DatasetSpec`; errors name ``source``."""
    try:
        return DatasetSpec.model_validate(data or {})
    except ValidationError as err:
        raise DataError(format_validation_error(str(source), err, "dataset spec", "segcore/data/spec.py",
                                                model=DatasetSpec)) from None


def load_spec(data_dir: str | Path) -> DatasetSpec:
    """Read ``<data_dir>/dataset.yaml`` (defaults when absent). Class names missing from an ids
    dataset are inferred from the masks as ``class_0 .. class_{max}``."""
    data_dir = Path(data_dir)
    path = data_dir / SPEC_FILE
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise DataError(path, f"not valid YAML ({err})", "fix the syntax") from None
        if data is not None and not isinstance(data, dict):
            raise DataError(path, "must hold a mapping of keys (classes, mask_mode, ...)", "see segcore/data/spec.py")
        spec = parse_spec(data, path)
    else:
        spec = DatasetSpec()
    if not spec.class_names:
        k = _infer_num_classes(data_dir, spec)
        spec = spec.model_copy(update={"class_names": [f"class_{i}" for i in range(k)]})
        log.info("%s: no classes in %s; inferred %d classes from the masks", data_dir, SPEC_FILE, k)
    return spec


def _infer_num_classes(data_dir: Path, spec: DatasetSpec) -> int:
    """1 + the largest class id found in ``masks/`` (255 = ignore does not count)."""
    mask_dir = data_dir / "masks"
    if not mask_dir.is_dir():
        raise DataError(mask_dir, "masks folder not found", "put one mask per image in <data_dir>/masks/")
    top, values = -1, set()
    for path in sorted(p for p in mask_dir.iterdir() if is_supported(p)):
        for raw in read_image(path, palette_indices=True):
            uniq = np.unique(np.asarray(raw.array))
            uniq = np.array([spec.id_map.get(int(v), int(v)) for v in uniq])
            values.update(int(v) for v in uniq)
            valid = uniq[uniq != IGNORE]
            if valid.size:
                top = max(top, int(valid.max()))
    if values and values <= {0, IGNORE}:
        log.warning("%s: masks hold only 0 and 255; 255 means 'ignore'. For binary 0/255 masks "
                    "add 'id_map: {255: 1}' to %s", mask_dir, SPEC_FILE)
    return max(top + 1, 1)

