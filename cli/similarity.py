"""Compare the main face of two photos with dlib's 128-d face embeddings and print JSON.

Output (stdout, JSON): `distance` (Euclidean; lower is more alike), `same_person` (distance < the
threshold, 0.6 by default), `threshold`, `metric`, and per image its path, size, `faces_found` and
every face's box [left, top, right, bottom] and detector score (`used`: the face compared, the
largest confident one). A photo without a face is not an error: `distance` and `same_person` are
null and `note` says which photo had none (exit 0). Unreadable files exit 2 with a one-line message.
"""

from __future__ import annotations

import argparse
import json

from ..core.measurement import face_similarity as fs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image_a", metavar="IMG_A", help="first photo (PNG, JPEG, ...)")
    p.add_argument("image_b", metavar="IMG_B", help="second photo")
    p.add_argument("--threshold", type=float, default=fs.THRESHOLD,
                   help=f"same-person threshold on the face distance (default: {fs.THRESHOLD})")
    p.add_argument("--detector", choices=fs.DETECTORS, default="hog",
                   help="face detector: hog (fast, frontal faces) or cnn (slower on CPU, more poses) (default: hog)")


def compare_files(path_a, path_b, threshold: float = fs.THRESHOLD, detector: str = "hog") -> dict:
    from ..core.files.images import load_image

    images = [load_image(path_a), load_image(path_b)]   # both decoded before the models load
    embedder = fs.FaceEmbedder(detector=detector)
    a, b = (embedder.analyze(im) for im in images)
    distance = fs.face_distance(a, b)
    missing = [str(p) for p, r in ((path_a, a), (path_b, b)) if not r.has_face]
    return {
        "distance": None if distance is None else round(distance, 4),
        "same_person": fs.same_person(distance, threshold),
        "threshold": threshold,
        "metric": fs.EMBEDDING_MODEL,
        "detector": detector,
        "images": [dict(path=str(p), **r.to_json()) for p, r in ((path_a, a), (path_b, b))],
        "note": f"no face found in {' and '.join(missing)}" if missing else None,
    }


def run(args) -> int:
    from ..core.errors import UserInputError

    if not 0 < args.threshold < 4:
        raise UserInputError(f"--threshold must be between 0 and 4 (distances of unit-scale 128-d vectors), "
                             f"got {args.threshold}")
    print(json.dumps(compare_files(args.image_a, args.image_b, args.threshold, args.detector), indent=2))
    return 0
