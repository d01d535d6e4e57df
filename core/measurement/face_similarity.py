"""Face similarity on CPU: dlib's 128-d face embeddings (`dlib-bin` + `face_recognition_models`).

The weights ship inside the `face_recognition_models` wheel; nothing is downloaded. Per image:
1. detect faces (dlib's HOG frontal detector by default, its CNN/MMOD detector on request); images
   larger than `max_side` are scaled down for detection (boxes are reported in the original pixels);
   when nothing is found, detection is retried once on a 2x upsampled image (small faces);
2. the face used is the largest of the confident detections (score at least half the best one's), so a
   large, barely-passing false detection does not beat a clear face;
3. its 5 landmarks align it, and dlib's ResNet (`dlib_face_recognition_resnet_model_v1`) maps the
   aligned 150x150 chip to a 128-d vector.

Two faces are the same person when the Euclidean distance of their vectors is below 0.6 (the
model's published operating point: 99.38 % on LFW). Typical values: same person about 0.2-0.4,
different people about 0.7-0.8. An image without a face is a result (`has_face` False, distance
None), never an exception.

`face_recognition_models/__init__.py` imports setuptools' `pkg_resources` (removed from recent
setuptools), so the model files are located with `importlib.util.find_spec` without importing it.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from ..errors import UserInputError
from ..files.images import to_rgb

THRESHOLD = 0.6
CONFIDENT_FRACTION = 0.5
DETECTORS = ("hog", "cnn")
EMBEDDING_MODEL = "dlib_face_recognition_resnet_model_v1 (128-d, Euclidean distance)"
INSTALL_HINT = ("face similarity needs the packages dlib-bin and face_recognition_models: "
                "pip install 'comfyui-qwen-identity[eval]' (or pip install dlib-bin face_recognition_models)")
_MODEL_FILES = {
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "landmarks5": "shape_predictor_5_face_landmarks.dat",
    "cnn": "mmod_human_face_detector.dat",
}


def _import_dlib():
    try:
        import dlib
    except ImportError:
        raise UserInputError(INSTALL_HINT) from None
    return dlib


def models_dir() -> Path:
    """The folder of `face_recognition_models`' .dat files (found without importing the package)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(INSTALL_HINT)
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    missing = [name for name in _MODEL_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise UserInputError(f"face_recognition_models is installed but {folder} lacks {', '.join(missing)}: "
                             "reinstall it (pip install --force-reinstall face_recognition_models).")
    return folder


@functools.lru_cache(maxsize=None)
def _load(what: str):
    dlib = _import_dlib()
    if what == "hog":
        return dlib.get_frontal_face_detector()
    path = str(models_dir() / _MODEL_FILES[what])
    if what == "cnn":
        return dlib.cnn_face_detection_model_v1(path)
    if what == "landmarks5":
        return dlib.shape_predictor(path)
    return dlib.face_recognition_model_v1(path)


@dataclass(frozen=True)
class FaceBox:
    """One detection: box (left, top, right, bottom) in the original image's pixels and the detector score."""

    box: tuple[int, int, int, int]
    score: float

    @property
    def area(self) -> int:
        left, top, right, bottom = self.box
        return max(0, right - left) * max(0, bottom - top)

    def to_json(self) -> dict:
        return {"box": list(self.box), "score": round(self.score, 4)}


@dataclass
class FaceResult:
    """What was found in one image. `faces[0]` is the face used when there is one."""

    size: tuple[int, int]
    faces: list[FaceBox] = field(default_factory=list)
    embedding: np.ndarray | None = None

    @property
    def has_face(self) -> bool:
        return self.embedding is not None

    def to_json(self) -> dict:
        return {"size": list(self.size), "faces_found": len(self.faces),
                "faces": [dict(f.to_json(), used=(i == 0)) for i, f in enumerate(self.faces)]}


def face_distance(a: np.ndarray | FaceResult | None, b: np.ndarray | FaceResult | None) -> float | None:
    """Euclidean distance of two face embeddings; None when either side has no face."""
    a = a.embedding if isinstance(a, FaceResult) else a
    b = b.embedding if isinstance(b, FaceResult) else b
    if a is None or b is None:
        return None
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


def same_person(distance: float | None, threshold: float = THRESHOLD) -> bool | None:
    return None if distance is None else bool(distance < threshold)


def order_faces(found: Sequence[tuple[tuple[int, int, int, int], float]],
                confident_fraction: float = CONFIDENT_FRACTION) -> list[tuple[tuple[int, int, int, int], float]]:
    """Detections ordered so that the face to use comes first: the largest of the confident ones.

    Confident means a score of at least `confident_fraction` of the best score; this keeps a large,
    barely-passing false detection (HOG finds a "face" in the NASA patch of scikit-image's astronaut
    photo at score ~0.09, next to her real face at ~1.5) from beating a clear face. The rest follow,
    largest first.
    """
    if not found:
        return []

    def area(f):
        left, top, right, bottom = f[0]
        return max(0, right - left) * max(0, bottom - top)

    best = max(score for _, score in found)
    cut = best * confident_fraction if best > 0 else best
    confident = sorted((f for f in found if f[1] >= cut), key=lambda f: (area(f), f[1]), reverse=True)
    rest = sorted((f for f in found if f[1] < cut), key=lambda f: (area(f), f[1]), reverse=True)
    return confident + rest


class FaceEmbedder:
    """Detect the main face of each image and embed it. Models load once per process (cached)."""

    def __init__(self, detector: str = "hog", max_side: int = 1600, retry_upsampled: bool = True):
        if detector not in DETECTORS:
            raise UserInputError(f"unknown face detector {detector!r}: use one of {', '.join(DETECTORS)}")
        if max_side < 64:
            raise UserInputError(f"max_side must be at least 64 pixels, got {max_side}")
        self.detector = detector
        self.max_side = int(max_side)
        self.retry_upsampled = retry_upsampled
        _import_dlib()
        models_dir()

    def _detect(self, arr: np.ndarray, upsample: int) -> list[tuple[tuple[int, int, int, int], float]]:
        if self.detector == "hog":
            rects, scores, _ = _load("hog").run(arr, upsample, 0.0)
            return [((r.left(), r.top(), r.right(), r.bottom()), float(s)) for r, s in zip(rects, scores)]
        found = _load("cnn")(arr, upsample)
        return [((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()), float(d.confidence)) for d in found]

    def _detect_all(self, image: Image.Image):
        """(RGB image, detection array, its scale, faces ordered so the one to use comes first)."""
        image = to_rgb(image)
        w, h = image.size
        scale = min(1.0, self.max_side / max(w, h))
        work = image if scale == 1.0 else image.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                         Image.Resampling.LANCZOS)
        arr = np.ascontiguousarray(np.asarray(work, dtype=np.uint8))
        found = self._detect(arr, 0)
        if not found and self.retry_upsampled and max(work.size) <= 1200:
            found = self._detect(arr, 1)
        return image, arr, scale, order_faces(found)

    def analyze(self, image: Image.Image) -> FaceResult:
        """All faces in `image` (largest, then most confident, first) and the embedding of the first."""
        dlib = _import_dlib()
        image, arr, scale, found = self._detect_all(image)
        w, h = image.size
        if not found:
            return FaceResult(size=(w, h))
        (left, top, right, bottom), _ = found[0]
        rect = dlib.rectangle(left, top, right, bottom)
        shape = _load("landmarks5")(arr, rect)
        embedding = np.asarray(_load("recognition").compute_face_descriptor(arr, shape), dtype=np.float64)

        def to_original(box):
            return tuple(int(round(min(max(v / scale, 0), lim))) for v, lim in zip(box, (w, h, w, h)))

        faces = [FaceBox(to_original(box), score) for box, score in found]
        return FaceResult(size=(w, h), faces=faces, embedding=embedding)

    def locate(self, image: Image.Image) -> tuple[list[FaceBox], np.ndarray | None]:
        """All faces (the one to use first, boxes in the original pixels) and the 5 landmarks of the first
        ([5, 2] float x, y in the original pixels: two corners of one eye, two of the other, the nose base),
        or ([], None). No embedding is computed (the face crop of the features needs only this)."""
        dlib = _import_dlib()
        image, arr, scale, found = self._detect_all(image)
        w, h = image.size
        if not found:
            return [], None
        (left, top, right, bottom), _ = found[0]
        shape = _load("landmarks5")(arr, dlib.rectangle(left, top, right, bottom))
        points = np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)], dtype=np.float64)

        def to_original(box):
            return tuple(int(round(min(max(v / scale, 0), lim))) for v, lim in zip(box, (w, h, w, h)))

        return [FaceBox(to_original(box), score) for box, score in found], points / scale

    def analyze_many(self, images: Iterable[Image.Image],
                     progress: Callable[[int, int], None] | None = None) -> list[FaceResult]:
        images = list(images)
        out = []
        for i, im in enumerate(images):
            out.append(self.analyze(im))
            if progress:
                progress(i + 1, len(images))
        return out


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else None


def score_against_references(results: Sequence[FaceResult], references: Sequence[FaceResult],
                             threshold: float = THRESHOLD) -> dict:
    """Each image's face distance to the reference faces (mean and min over references) and a summary.

    An image or reference without a face is reported, never an error; `mean_distance` is the mean over
    the images that have a face (None when none has), `same_person_rate` the share of those below
    the threshold.
    """
    refs = [r for r in references if r.has_face]
    per_image = []
    for i, r in enumerate(results):
        dists = [face_distance(r, ref) for ref in refs] if r.has_face else []
        mean_d, min_d = _mean(dists), (min(dists) if dists else None)
        per_image.append({"index": i, "has_face": r.has_face, "distance": mean_d, "min_distance": min_d,
                          "same_person": same_person(mean_d, threshold), **r.to_json()})
    with_face = [p["distance"] for p in per_image if p["distance"] is not None]
    return {
        "metric": EMBEDDING_MODEL,
        "threshold": threshold,
        "references": len(references),
        "references_with_face": len(refs),
        "images": len(results),
        "images_with_face": sum(r.has_face for r in results),
        "mean_distance": _mean(with_face),
        "same_person_rate": (sum(d < threshold for d in with_face) / len(with_face)) if with_face else None,
        "per_image": per_image,
        "note": ("no face found in any reference photo: distances cannot be computed" if not refs else
                 "no face found in any scored image" if not with_face else None),
    }


def mean_pairwise_distance(results: Sequence[FaceResult]) -> float | None:
    """Diversity: the mean face distance over all pairs of images that have a face (None below 2)."""
    embs = [r.embedding for r in results if r.has_face]
    return _mean(face_distance(a, b) for a, b in itertools.combinations(embs, 2))
