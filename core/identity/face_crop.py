"""Which part of a photo Qwen3-VL looks at: the face (aligned), the centre square, or the whole photo.

Identity packs users know (IPAdapter FaceID, PuLID, InstantID) detect, align and crop the face before
the encoder sees it; features of the whole photo also react to clothes and background. The one
setting `crop` chooses the region, before the resolution policy (core/identity/features.py) sizes it:

- `face` (the default for new heads): dlib's frontal face detector (the one `ScoreIdentity` and
  `qwen-identity similarity` use, weights inside the `face_recognition_models` wheel) finds the faces;
  the largest confident one is used (a note says so when there are several). Its 5 landmarks give the
  eye centres; the photo is rotated about the face centre so the eyes are level, and a square of side
  `FACE_MARGIN` x the detector box's side, centred on the box, is cut out (parts outside the photo are
  filled with mid-grey, which Qwen3-VL's normalisation maps to 0). The square is then sized like any
  other (448x448 under `center_crop_448`).
- `center`: the photo as before this setting existed: under `center_crop_448` the shortest side goes to
  448 and the centre 448x448 square is kept (the face may be cut off or small).
- `full`: the whole photo. Under `center_crop_448` it is letterboxed: scaled so its longer side is 448,
  centred on a 448x448 mid-grey square (nothing is cut, the person is smaller). Under `pixel_budget`
  the aspect is kept (no padding).

A photo in which no face is found is an error naming the photo, unless the caller chose a
`crop_fallback` (`center` or `full`): then that photo is cropped that way and a note says so.

Heads and features record their crop. Heads and features made before the setting existed record none:
they were made with the centre crop (`center_crop_448`, the default then) or with the whole photo
(`pixel_budget`), and `legacy_crop` names which, so they keep working exactly as they did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..errors import UserInputError
from ..files.images import to_rgb

CROPS = ("face", "center", "full")
DEFAULT_CROP = "face"
CROP_FALLBACKS = ("error", "center", "full")
DEFAULT_CROP_FALLBACK = "error"
FACE_MARGIN = 2.0           # side of the face square / side of dlib's face box (about forehead to chin)
FILL = (128, 128, 128)      # mid-grey: 0 after Qwen3-VL's normalisation (mean 0.5, std 0.5)

CROP_HELP = ("face (default): the face, found by dlib's face detector, rotated so the eyes are level, a square "
             f"{FACE_MARGIN:g}x the detected face box; center: the centre square of the photo (the behaviour before "
             "this setting); full: the whole photo (letterboxed onto a grey square at 448x448). Use the crop the "
             "head was trained with.")
FALLBACK_HELP = ("what to do with a photo in which no face is found when crop is face: error (default: stop and "
                 "name the photo), center or full (crop that photo that way, with a note).")


def legacy_crop(meta: dict[str, Any] | None) -> str:
    """The crop of features/heads recorded in `meta`; for those made before the setting existed, the crop they
    were made with (the whole photo under `pixel_budget`, else the centre crop)."""
    meta = meta or {}
    crop = meta.get("crop")
    if crop in CROPS:
        return str(crop)
    return "full" if meta.get("resolution") == "pixel_budget" else "center"


def check_crop(crop: str, fallback: str = DEFAULT_CROP_FALLBACK) -> None:
    if crop not in CROPS:
        raise UserInputError(f"unknown crop {crop!r}: use one of {', '.join(CROPS)}.")
    if fallback not in CROP_FALLBACKS:
        raise UserInputError(f"unknown crop_fallback {fallback!r}: use one of {', '.join(CROP_FALLBACKS)}.")


@dataclass(frozen=True)
class CropInfo:
    """What happened to one photo: the crop used, the face box and eye angle (face crops), and a note."""

    crop: str                                   # the crop actually used ("center"/"full" after a fallback)
    faces_found: int = 0
    box: tuple[int, int, int, int] | None = None  # the face used, in the photo's pixels
    eye_angle: float | None = None                # degrees the photo was turned to level the eyes
    note: str = ""

    def to_json(self) -> dict:
        return {"crop": self.crop, "faces_found": self.faces_found, "box": list(self.box) if self.box else None,
                "eye_angle": None if self.eye_angle is None else round(self.eye_angle, 2), "note": self.note}


class NoFaceError(UserInputError):
    """No face was found in one or more photos while crop is `face` and no fallback was chosen."""


_EMBEDDER = None


def _locator():
    """The face locator (dlib detector + 5-point landmarks), built once per process."""
    global _EMBEDDER
    if _EMBEDDER is None:
        from ..measurement.face_similarity import INSTALL_HINT, FaceEmbedder

        try:
            _EMBEDDER = FaceEmbedder()
        except UserInputError as e:
            if INSTALL_HINT in str(e):
                raise UserInputError(f"crop 'face' needs a face detector: {INSTALL_HINT}. Or choose crop 'center' "
                                     "(the centre square) or 'full' (the whole photo).") from None
            raise
    return _EMBEDDER


def eye_centres(landmarks) -> tuple[tuple[float, float], tuple[float, float]]:
    """(left, right) eye centres in the image (by x) from dlib's 5 landmarks (2 corners per eye, then the nose)."""
    a = (float(landmarks[0][0] + landmarks[1][0]) / 2, float(landmarks[0][1] + landmarks[1][1]) / 2)
    b = (float(landmarks[2][0] + landmarks[3][0]) / 2, float(landmarks[2][1] + landmarks[3][1]) / 2)
    return (a, b) if a[0] <= b[0] else (b, a)


def face_square(image: Image.Image, box: tuple[int, int, int, int], landmarks,
                margin: float = FACE_MARGIN) -> tuple[Image.Image, float]:
    """The aligned square around a face: rotated about the box centre so the eyes are level, side
    margin x the box's longer side, at the photo's own pixel scale; outside the photo is mid-grey.
    Returns (square, the eye line's angle in degrees)."""
    (lx, ly), (rx, ry) = eye_centres(landmarks)
    theta = math.atan2(ry - ly, rx - lx)
    left, top, right, bottom = box
    cx, cy = (left + right) / 2.0, (top + bottom) / 2.0
    side = max(8, int(round(max(right - left, bottom - top) * margin)))
    half = side / 2.0
    cos, sin = math.cos(theta), math.sin(theta)
    # output pixel (u, v) -> input (x, y) = centre + R(theta) @ ((u, v) - half)
    data = (cos, -sin, cx - cos * half + sin * half,
            sin, cos, cy - sin * half - cos * half)
    square = image.transform((side, side), Image.Transform.AFFINE, data, resample=Image.Resampling.BICUBIC,
                             fillcolor=FILL)
    return square, math.degrees(theta)


def letterbox(image: Image.Image, size: int) -> Image.Image:
    """The whole photo scaled so its longer side is `size`, centred on a size x size mid-grey square."""
    w, h = image.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = image.resize(new, Image.Resampling.BICUBIC) if new != (w, h) else image
    canvas = Image.new("RGB", (size, size), FILL)
    canvas.paste(resized, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def crop_region(image: Image.Image, crop: str, fallback: str = DEFAULT_CROP_FALLBACK,
                name: str = "photo") -> tuple[Image.Image, CropInfo]:
    """The region of `image` that `crop` selects, before sizing: the aligned face square for `face`, the
    photo itself for `center` and `full` (their sizing differs, see the module docstring).

    No face with fallback `error`: NoFaceError naming the photo. Several faces: the largest confident one,
    with a note."""
    check_crop(crop, fallback)
    image = to_rgb(image)
    if crop != "face":
        return image, CropInfo(crop=crop)
    faces, landmarks = _locator().locate(image)
    if not faces:
        if fallback == "error":
            raise NoFaceError(f"no face found in {name}: use a photo where the face is visible and at least about "
                              "80 pixels wide, or choose crop_fallback 'center' / 'full' (that photo is then cropped "
                              "that way), or crop 'center' / 'full' for all photos.")
        return image, CropInfo(crop=fallback, note=f"no face found in {name}: used the {fallback} crop instead")
    square, angle = face_square(image, faces[0].box, landmarks)
    note = (f"{len(faces)} faces found in {name}: used the largest clear one at {list(faces[0].box)}"
            if len(faces) > 1 else "")
    return square, CropInfo(crop="face", faces_found=len(faces), box=faces[0].box, eye_angle=angle, note=note)


__all__ = ["CROPS", "DEFAULT_CROP", "CROP_FALLBACKS", "DEFAULT_CROP_FALLBACK", "FACE_MARGIN", "CROP_HELP",
           "FALLBACK_HELP", "CropInfo", "NoFaceError", "crop_region", "face_square", "letterbox", "legacy_crop",
           "check_crop", "eye_centres"]
