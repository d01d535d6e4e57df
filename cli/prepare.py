"""Write seed directories (seed_<person>/photo_view_<i>.png + caption.txt) from photos grouped per person.

Input, one of:
  --photos DIR                 one sub-folder per person (LFW, VGGFace2, CASIA-WebFace layout); a
                               caption.txt in a person's folder is that person's caption;
  --list FILE [--photos DIR]   a list of photo -> person id: .csv/.tsv (header with file/path/image and
                               person/identity/id/label columns, optional caption; or two columns
                               without a header), .txt ('FILE PERSON' lines, CelebA's identity_CelebA.txt),
                               or .json ({file: person}, {person: [files]} or [{"file","person","caption"}]).
                               Relative paths are relative to --photos (default: the list's folder).
A photo is kept when dlib finds exactly one confident face at least --min-face pixels wide; the others
are skipped and counted by reason. People with fewer than --min-photos usable photos are skipped.
Output in --out-dir: the seed folders, prepared_seed_dirs.txt (one folder a line: pass it to --seed-dirs-file)
and prepare_report.json (every photo kept or skipped, and why). Deterministic; inputs are only read;
every file is written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.identity.prepare import FACE_DETECTORS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--photos", default=None, help="folder with one sub-folder of photos per person; with --list: "
                   "the folder the list's relative paths start from (default: the list file's folder)")
    p.add_argument("--list", default=None, dest="list_file",
                   help="a .csv/.tsv/.txt/.json list of photo -> person id (instead of sub-folders)")
    p.add_argument("--out-dir", required=True, help="output folder for seed_*/ (must not overlap the inputs)")
    p.add_argument("--caption", default=None, help="caption.txt for people without a known caption "
                   "(e.g. 'a photo of a person'); known captions (caption.txt, the list's caption column) win")
    p.add_argument("--face-detector", default="hog", choices=FACE_DETECTORS,
                   help="dlib face detector: hog (fast, frontal), cnn (slower, more poses), or none (keep every "
                        "readable photo, no face check) (default: hog)")
    p.add_argument("--min-face", type=int, default=64,
                   help="smallest face kept: short side of the face box in the photo's pixels (default: 64)")
    p.add_argument("--allow-several-faces", action="store_true",
                   help="keep photos with several confident faces (the largest is the person); default: skip them")
    p.add_argument("--min-side", type=int, default=0,
                   help="skip photos whose short side is below this many pixels (default: 0 = no limit)")
    p.add_argument("--max-side", type=int, default=0,
                   help="scale written photos down to this longest side (default: 0 = original size)")
    p.add_argument("--min-photos", type=int, default=2,
                   help="skip people with fewer usable photos (default: 2; train --objective denoise needs other "
                        "views of the same person; use 1 for caption training)")
    p.add_argument("--max-photos", type=int, default=0,
                   help="keep at most this many usable photos per person, first in sorted order (default: 0 = all)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier prepare run in --out-dir (its files that this run does not write are removed)")


def run(args) -> int:
    from ..core.errors import UserInputError
    from ..core.files.out_dir_lock import OutDirLock
    from ..core.identity import prepare as prep
    from ..core.runtime.progress import tqdm_progress

    if not args.photos and not args.list_file:
        raise UserInputError("give the photos: --photos DIR (one sub-folder per person) or --list FILE "
                             "(photo -> person id).")
    settings = prep.PrepareSettings(face_detector=args.face_detector, min_face=args.min_face,
                                    allow_several_faces=args.allow_several_faces, min_side=args.min_side,
                                    max_side=args.max_side, min_photos=args.min_photos, max_photos=args.max_photos,
                                    caption=(args.caption or "").strip() or None)
    settings.check()
    if args.list_file:   # the inputs are the listed photos (the list may sit next to the output folder)
        people = prep.read_person_list(args.list_file, args.photos)
        root = Path(args.photos) if args.photos else Path(args.list_file).parent
        sources, photos = [], [p for person in people for p in person.photos]
    else:                # the scanned folder: an output inside it would be read as a person next time
        people = prep.scan_person_folders(args.photos)
        root = Path(args.photos)
        sources, photos = [root], []
    out = Path(args.out_dir)
    prep.check_paths(sources, out, args.overwrite, photos)
    with OutDirLock(out):
        print(f"prepare: {len(people)} people, {sum(len(p.photos) for p in people)} photos; face check: "
              f"{settings.face_detector}")
        with tqdm_progress("prepare") as bar:
            report = prep.prepare(people, out, settings, source_root=root, overwrite=args.overwrite, progress=bar)
    for line in prep.summary_lines(report):
        print(line)
    print(f"wrote {out} ({prep.SEED_LIST_FILE}: pass it to --seed-dirs-file; details in {prep.REPORT_FILE})")
    if not report["people_written"]:
        raise UserInputError(f"no person has {settings.min_photos} usable photo(s); see {out / prep.REPORT_FILE} "
                             "for every photo's reason (lower --min-photos / --min-face, or --face-detector cnn).")
    return 0
