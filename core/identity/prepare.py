"""Turn photos grouped per person into the seed-dir layout that extract/train/sweep/eval read.

Why: public face data sets with identity labels come in two shapes, and training a head needs the
POC's layout (`seed_<id>/photo_view_<i>.png` + an optional `caption.txt`, see seed_dirs.py):
- one sub-folder per person (LFW, VGGFace2, CASIA-WebFace): `ROOT/<person>/<photo>`;
- a list file mapping photo -> person id (CelebA's `identity_CelebA.txt`, or a CSV/JSON export):
  `.csv` (header with file/path/image and person/identity/id/label columns, optional caption; or two
  columns without a header), `.tsv`, `.txt` (whitespace-separated `file person`), `.json` (an object
  `{file: person}` or `{person: [files]}`, or a list of `{"file", "person", "caption"}` records).

A photo is kept only when it has a usable face (dlib, the detector face_similarity.py uses): one
confident face (not several), whose box is at least `min_face` pixels on its short side. Everything
skipped is counted by reason and listed in `prepare_report.json`. A person with fewer than
`min_photos` usable photos is skipped (denoise training needs other views of the same person).

Deterministic: people and photos are ordered by natural sort of their ids and paths, photos are
re-encoded as PNG (same pixels -> same bytes). Inputs are only read; every output is written
atomically; the caller holds the out-dir lock.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image

from ..errors import UserInputError
from ..files.atomic import atomic_write, atomic_write_json, atomic_write_text
from ..files.images import load_image
from .seed_dirs import CAPTION_FILE, PHOTO_GLOB, list_photos, natural_key

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
LIST_SUFFIXES = (".csv", ".tsv", ".txt", ".json")
REPORT_FILE = "prepare_report.json"
SEED_LIST_FILE = "prepared_seed_dirs.txt"  # not "seed_*": a seed_* glob must match folders only
FACE_DETECTORS = ("hog", "cnn", "none")
_FILE_COLUMNS = ("file", "filename", "path", "image", "image_id", "photo")
_PERSON_COLUMNS = ("person", "person_id", "identity", "identity_id", "id", "label", "name", "subject")
_CAPTION_COLUMNS = ("caption", "text", "prompt")

# skip reasons (keys of the report's counts)
UNREADABLE = "unreadable"
MISSING = "file not found"
NO_FACE = "no face"
SEVERAL_FACES = "several faces"
SMALL_FACE = "face too small"
SMALL_PHOTO = "photo too small"
OVER_LIMIT = "over --max-photos"


@dataclass
class Person:
    """One identity of the input: its id, its photos (as found), and a caption when one is known."""

    person_id: str
    photos: list[Path] = field(default_factory=list)
    caption: str | None = None


@dataclass(frozen=True)
class PrepareSettings:
    face_detector: str = "hog"
    min_face: int = 64          # shortest side of the face box, original pixels
    allow_several_faces: bool = False
    min_side: int = 0           # shortest side of the photo, original pixels (0: no limit)
    max_side: int = 0           # output photos are scaled down to this longest side (0: kept)
    min_photos: int = 2
    max_photos: int = 0         # 0: all
    caption: str | None = None  # for people without a known caption

    def check(self) -> None:
        if self.face_detector not in FACE_DETECTORS:
            raise UserInputError(f"unknown --face-detector {self.face_detector!r}: use one of {', '.join(FACE_DETECTORS)}.")
        for name, value, low in (("--min-face", self.min_face, 0), ("--min-side", self.min_side, 0),
                                 ("--max-side", self.max_side, 0), ("--min-photos", self.min_photos, 1),
                                 ("--max-photos", self.max_photos, 0)):
            if value < low:
                raise UserInputError(f"{name} must be at least {low}, got {value}.")
        if self.max_side and self.max_side < 64:
            raise UserInputError(f"--max-side must be 0 (keep) or at least 64 pixels, got {self.max_side}.")
        if self.max_photos and self.max_photos < self.min_photos:
            raise UserInputError(f"--max-photos {self.max_photos} is below --min-photos {self.min_photos}: "
                                 "every person would be skipped.")

    def to_json(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------- reading the input


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def scan_person_folders(root: str | os.PathLike) -> list[Person]:
    """One person per immediate sub-folder of `root` (its name is the id); its image files are the photos.

    A `caption.txt` in a person's folder is that person's caption. Hidden folders are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserInputError(f"--photos {root} is not a folder. Give the folder that holds one sub-folder per person.")
    people = []
    for sub in sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                      key=lambda d: natural_key(d.name)):
        photos = sorted((p for p in sub.iterdir() if _is_image(p)), key=lambda p: natural_key(p.name))
        cap_file = sub / CAPTION_FILE
        caption = _read_caption(cap_file) if cap_file.is_file() else None
        people.append(Person(sub.name, photos, caption))
    if not any(p.photos for p in people):
        loose = [p for p in root.iterdir() if _is_image(p)]
        hint = (f" It holds {len(loose)} photos directly: put each person's photos in a sub-folder named after "
                "the person, or pass --list FILE (photo -> person id)." if loose else "")
        raise UserInputError(f"--photos {root} has no sub-folder with photos ({', '.join(IMAGE_SUFFIXES)}).{hint}")
    return people


def _read_caption(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"cannot read caption {path} ({e}): it must be UTF-8 text.") from None
    return text or None


def _list_rows(list_file: Path) -> list[tuple[str, str, str | None]]:
    """(file, person, caption) rows of a list file, in file order."""
    suffix = list_file.suffix.lower()
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"cannot read --list {list_file} ({e}): it must be a UTF-8 text file.") from None
    if suffix == ".json":
        return _json_rows(list_file, text)
    if suffix == ".txt":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) < 2:
                raise UserInputError(f"--list {list_file} line {n}: expected 'FILE PERSON', got {line.strip()!r}.")
            rows.append((parts[0], parts[1], " ".join(parts[2:]) or None))
        return rows
    delimiter = "\t" if suffix == ".tsv" else ","
    table = [r for r in csv.reader(text.splitlines(), delimiter=delimiter) if r and any(c.strip() for c in r)]
    if not table:
        raise UserInputError(f"--list {list_file} is empty.")
    header = [c.strip().lower() for c in table[0]]
    file_col = next((header.index(c) for c in _FILE_COLUMNS if c in header), None)
    person_col = next((header.index(c) for c in _PERSON_COLUMNS if c in header), None)
    if file_col is not None and person_col is not None:
        cap_col = next((header.index(c) for c in _CAPTION_COLUMNS if c in header), None)
        body = table[1:]
    elif file_col is None and person_col is None:
        file_col, person_col, cap_col = 0, 1, (2 if len(table[0]) > 2 else None)
        body = table
    else:
        raise UserInputError(f"--list {list_file}: the header {table[0]} needs a photo column "
                             f"({'/'.join(_FILE_COLUMNS)}) and a person column ({'/'.join(_PERSON_COLUMNS)}).")
    rows = []
    for n, r in enumerate(body, 2 if body is not table else 1):
        if len(r) <= max(file_col, person_col):
            raise UserInputError(f"--list {list_file} row {n}: expected a photo and a person id, got {r}.")
        cap = r[cap_col].strip() if cap_col is not None and cap_col < len(r) else None
        rows.append((r[file_col].strip(), r[person_col].strip(), cap or None))
    return rows


def _json_rows(list_file: Path, text: str) -> list[tuple[str, str, str | None]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserInputError(f"--list {list_file} is not valid JSON ({e}).") from None
    bad = UserInputError(f"--list {list_file}: expected {{file: person}}, {{person: [files]}} or a list of "
                         '{"file": ..., "person": ..., "caption": ...} records.')
    rows = []
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, (str, int)):
                rows.append((str(key), str(value), None))
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                rows += [(v, str(key), None) for v in value]
            else:
                raise bad
    elif isinstance(data, list):
        for rec in data:
            if not isinstance(rec, dict):
                raise bad
            f = next((rec[c] for c in _FILE_COLUMNS if c in rec), None)
            p = next((rec[c] for c in _PERSON_COLUMNS if c in rec), None)
            if not isinstance(f, str) or not isinstance(p, (str, int)):
                raise bad
            cap = next((rec[c] for c in _CAPTION_COLUMNS if isinstance(rec.get(c), str)), None)
            rows.append((f, str(p), cap.strip() if cap and cap.strip() else None))
    else:
        raise bad
    return rows


def read_person_list(list_file: str | os.PathLike, photos_root: str | os.PathLike | None = None) -> list[Person]:
    """People from a list file; relative photo paths are resolved against `photos_root` (default: the list's folder).

    A person's caption is the first non-empty one listed for them. Listed files that do not exist are
    kept (they are reported as skipped, "file not found"); when none exists the root is wrong: an error.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise UserInputError(f"--list {list_file} does not exist or is not a file.")
    if list_file.suffix.lower() not in LIST_SUFFIXES:
        raise UserInputError(f"--list {list_file}: use a {', '.join(LIST_SUFFIXES)} file "
                             "(CSV/TSV with file and person columns, 'FILE PERSON' lines, or JSON).")
    root = Path(photos_root) if photos_root is not None else list_file.parent
    if not root.is_dir():
        raise UserInputError(f"--photos {root} is not a folder (photo paths in --list are relative to it).")
    rows = _list_rows(list_file)
    if not rows:
        raise UserInputError(f"--list {list_file} lists no photo.")
    people: dict[str, Person] = {}
    seen: dict[Path, str] = {}
    for f, pid, cap in rows:
        if not f or not pid:
            raise UserInputError(f"--list {list_file}: an entry has an empty photo or person id ({f!r}, {pid!r}).")
        path = Path(f) if os.path.isabs(f) else root / f
        if path in seen and seen[path] != pid:
            raise UserInputError(f"--list {list_file}: {f} is listed for two people ({seen[path]!r} and {pid!r}).")
        if path in seen:
            continue
        seen[path] = pid
        person = people.setdefault(pid, Person(pid))
        person.photos.append(path)
        if person.caption is None and cap:
            person.caption = cap
    if not any(p.exists() for p in seen):
        example = next(iter(seen))
        raise UserInputError(f"none of the {len(seen)} photos in --list {list_file} exists (e.g. {example}): "
                             "pass --photos DIR, the folder their paths are relative to.")
    out = sorted(people.values(), key=lambda p: natural_key(p.person_id))
    for p in out:
        p.photos.sort(key=lambda q: natural_key(str(q)))
    return out


# ---------------------------------------------------------------- naming


def seed_dir_names(person_ids: Iterable[str]) -> dict[str, str]:
    """person id -> `seed_<id>`, made filesystem-safe; ids that collide after cleaning get a short hash."""
    ids = list(person_ids)

    def clean(pid: str) -> str:
        s = re.sub(r"[^A-Za-z0-9._-]+", "_", pid).strip("._") or "person"
        return s[:80]

    names = {pid: f"seed_{clean(pid)}" for pid in ids}
    counts = Counter(names.values())
    for pid in ids:
        if counts[names[pid]] > 1:
            names[pid] = f"{names[pid]}-{hashlib.sha1(pid.encode()).hexdigest()[:8]}"
    return names


# ---------------------------------------------------------------- checking photos


class FaceCheck:
    """Says whether a photo has one usable face; `None` detector = every decodable photo passes."""

    def __init__(self, settings: PrepareSettings):
        self.settings = settings
        self._embedder = None
        if settings.face_detector != "none":
            from ..measurement import face_similarity as fs

            try:
                self._embedder = fs.FaceEmbedder(detector=settings.face_detector)
            except UserInputError as e:
                raise UserInputError(f"{e} (or pass --face-detector none to keep photos without checking faces).") from None

    def reason_to_skip(self, image: Image.Image) -> tuple[str | None, dict]:
        """(None, details) for a usable photo, else (reason, details)."""
        s = self.settings
        w, h = image.size
        if s.min_side and min(w, h) < s.min_side:
            return SMALL_PHOTO, {"size": [w, h]}
        if self._embedder is None:
            return None, {}
        from ..measurement.face_similarity import CONFIDENT_FRACTION

        result = self._embedder.analyze(image)
        if not result.has_face:
            return NO_FACE, {}
        best = max(f.score for f in result.faces)
        confident = [f for f in result.faces if f.score >= best * CONFIDENT_FRACTION]
        face = result.faces[0]
        details = {"face": list(face.box), "faces_found": len(confident)}
        if len(confident) > 1 and not s.allow_several_faces:
            return SEVERAL_FACES, details
        left, top, right, bottom = face.box
        if min(right - left, bottom - top) < s.min_face:
            return SMALL_FACE, details
        return None, details


# ---------------------------------------------------------------- writing


def _encode_png(image: Image.Image, max_side: int) -> Callable[[Path], None]:
    if max_side and max(image.size) > max_side:
        w, h = image.size
        scale = max_side / max(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    return lambda tmp: image.save(tmp, format="PNG")


def check_paths(sources: list[Path], out_dir: Path, overwrite: bool, photos: Iterable[Path] = ()) -> None:
    """Refuse an out-dir that overlaps an input folder (`sources`: the scanned folder of the sub-folder layout),
    that holds an input photo (the list layout), or that holds an earlier run without --overwrite."""
    out = Path(os.path.abspath(out_dir))
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out-dir {out_dir} is a file, not a folder. Choose another output folder.")
    inside = next((p for p in photos if out in Path(os.path.abspath(p)).parents), None)
    if inside is not None:
        raise UserInputError(f"--out-dir {out_dir} holds the listed photo {inside}: prepare never writes into its "
                             "inputs. Choose an output folder outside the photos.")
    for src in sources:
        s = Path(os.path.abspath(src))
        if out == s or s in out.parents or out in s.parents:
            raise UserInputError(f"--out-dir {out_dir} overlaps the input folder {src}: prepare never writes "
                                 "into its inputs. Choose an output folder outside it.")
    if out.is_dir() and not overwrite:
        earlier = sorted(p.name for p in out.iterdir() if p.name.startswith("seed_") or p.name == REPORT_FILE)
        if earlier:
            raise UserInputError(f"--out-dir {out_dir} already holds {', '.join(earlier[:3])}"
                                 f"{' ...' if len(earlier) > 3 else ''}: pass --overwrite to replace an earlier "
                                 "prepare run, or choose an empty folder.")


def _remove_stale(out_dir: Path, written: set[str], kept_photos: dict[str, int], has_caption: dict[str, bool]) -> list[str]:
    """With --overwrite: remove what an earlier prepare run wrote that this run does not (only its own files)."""
    removed = []
    report = out_dir / REPORT_FILE
    earlier: list[str] = []
    if report.is_file():
        try:
            earlier = [p["seed_dir"] for p in json.loads(report.read_text(encoding="utf-8")).get("people", [])]
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            earlier = []
    for name in sorted(set(earlier) | written):
        d = out_dir / name
        if not d.is_dir() or d.is_symlink() or not name.startswith("seed_") or "/" in name or ".." in name:
            continue
        keep = kept_photos.get(name, 0)
        for p in list_photos(d):
            m = re.fullmatch(r"photo_view_(\d+)\.png", p.name)
            if m and int(m.group(1)) >= keep:
                p.unlink()
                removed.append(str(p.relative_to(out_dir)))
        cap = d / CAPTION_FILE
        if cap.is_file() and not has_caption.get(name, False):
            cap.unlink()
            removed.append(str(cap.relative_to(out_dir)))
        if name not in written and not any(d.iterdir()):
            d.rmdir()
    return removed


def prepare(people: list[Person], out_dir: str | os.PathLike, settings: PrepareSettings,
            source_root: str | os.PathLike | None = None, overwrite: bool = False,
            progress: Callable[[int, int], None] | None = None) -> dict:
    """Check every photo, write the seed dirs, the seed-dir list and `prepare_report.json`; return the report."""
    settings.check()
    out_dir = Path(out_dir)
    checker = FaceCheck(settings)
    names = seed_dir_names(p.person_id for p in people)
    total = sum(len(p.photos) for p in people)
    skipped_counts: Counter = Counter()
    report_people, skipped_people = [], []
    kept_photos: dict[str, int] = {}
    has_caption: dict[str, bool] = {}

    def rel(p: Path) -> str:
        if source_root is not None:
            try:
                return Path(os.path.relpath(p, source_root)).as_posix()
            except ValueError:
                pass
        return str(p)

    done = 0
    written: set[str] = set()
    for person in people:   # one person at a time: a large data set never sits in memory at once
        usable, skipped = [], []
        for path in person.photos:
            done += 1
            if settings.max_photos and len(usable) >= settings.max_photos:
                skipped.append({"source": rel(path), "reason": OVER_LIMIT})
            elif not path.exists():
                skipped.append({"source": rel(path), "reason": MISSING})
            else:
                try:
                    image = load_image(path)
                except UserInputError as e:
                    skipped.append({"source": rel(path), "reason": UNREADABLE, "error": str(e)})
                else:
                    reason, details = checker.reason_to_skip(image)
                    if reason:
                        skipped.append({"source": rel(path), "reason": reason, **details})
                    else:
                        usable.append((path, image, details))
            if progress:
                progress(done, total)
        skipped_counts.update(s["reason"] for s in skipped if s["reason"] != OVER_LIMIT)
        name = names[person.person_id]
        entry = {"person": person.person_id, "seed_dir": name,
                 "caption": person.caption or settings.caption, "skipped": skipped}
        if len(usable) < settings.min_photos:
            skipped_people.append(dict(entry, usable=len(usable),
                                       reason=f"{len(usable)} usable photo(s), fewer than --min-photos {settings.min_photos}"))
            continue
        d = out_dir / name
        for i, (path, image, _) in enumerate(usable):
            atomic_write(d / f"photo_view_{i}.png", _encode_png(image, settings.max_side))
        if entry["caption"]:
            atomic_write_text(d / CAPTION_FILE, entry["caption"] + "\n")
        entry["photos"] = [{"source": rel(path), "view": f"photo_view_{i}.png", **details}
                           for i, (path, _, details) in enumerate(usable)]
        written.add(name)
        kept_photos[name] = len(usable)
        has_caption[name] = bool(entry["caption"])
        report_people.append(entry)
    removed = _remove_stale(out_dir, written, kept_photos, has_caption) if overwrite else []
    kept = sum(len(e["photos"]) for e in report_people)
    report = {
        "settings": settings.to_json(),
        "people_in": len(people),
        "people_written": len(report_people),
        "people_skipped": len(skipped_people),
        "photos_in": total,
        "photos_written": kept,
        "photos_skipped": dict(sorted(skipped_counts.items())),
        "photos_over_max": sum(1 for e in report_people + skipped_people for s in e["skipped"]
                               if s["reason"] == OVER_LIMIT),
        "people": report_people,
        "skipped_people": skipped_people,
        "removed_from_earlier_run": removed,
    }
    atomic_write_text(out_dir / SEED_LIST_FILE,
                      "".join(f"{os.path.abspath(out_dir / e['seed_dir'])}\n" for e in report_people))
    atomic_write_json(out_dir / REPORT_FILE, report)
    return report


def summary_lines(report: dict) -> list[str]:
    """The human summary the CLI prints: what was written and every skip reason with its count."""
    lines = [f"{report['people_written']} of {report['people_in']} people written, "
             f"{report['photos_written']} of {report['photos_in']} photos."]
    for reason, n in report["photos_skipped"].items():
        lines.append(f"skipped {n} photo(s): {reason}")
    if report["photos_over_max"]:
        lines.append(f"left out {report['photos_over_max']} photo(s) over --max-photos")
    if report["skipped_people"]:
        lines.append(f"skipped {len(report['skipped_people'])} people: fewer usable photos than --min-photos "
                     f"{report['settings']['min_photos']} (e.g. {report['skipped_people'][0]['person']}: "
                     f"{report['skipped_people'][0]['reason']})")
    return lines


__all__ = ["Person", "PrepareSettings", "prepare", "read_person_list", "scan_person_folders", "seed_dir_names",
           "summary_lines", "check_paths", "REPORT_FILE", "SEED_LIST_FILE", "PHOTO_GLOB", "FACE_DETECTORS"]
