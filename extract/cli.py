"""``avemo-extract``: a thin command line over ``extract.extract_folder``."""
from __future__ import annotations

import argparse
import sys

from avemo.io import NoSpaceError
from extract.labels import SCHEMES
from extract.workers import prestart


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="avemo-extract",
        description="Turn a folder of clips (video or audio) into a cache of face-feature sequences "
                    "and log-mel spectrograms, one .npz per clip plus manifest.csv. Re-running resumes.")
    p.add_argument("video_dir", metavar="VIDEO_DIR", help="folder searched recursively for clips")
    p.add_argument("--out", required=True, metavar="CACHE", help="cache folder (created; resumed if it exists)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--frames", type=int, metavar="N", help="frames sampled evenly over each clip (default 16)")
    when.add_argument("--fps", type=float, metavar="F", help="frames sampled per second instead")
    lab = p.add_mutually_exclusive_group()
    lab.add_argument("--label-from", choices=SCHEMES,
                     help="labels (and speakers) from the parent folder name or a dataset's file names")
    lab.add_argument("--labels", metavar="CSV", help="CSV with columns clip,label[,speaker]")
    p.add_argument("--face-encoder", default="default", metavar="NAME|PATH",
                   help="shipped encoder name or encoder file (default: default)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="parallel extraction processes (default: one per usable CPU, at most 8 and as many "
                        "as the available memory holds at 1 GB each)")
    p.add_argument("--shard", metavar="I/N", help="do only shard I of N (1-based), e.g. $SLURM_ARRAY_TASK_ID/8")
    p.add_argument("--keep-crops", action="store_true", help="also store the aligned face crops (uint8)")
    p.add_argument("--feature-maps", action="store_true",
                   help="also store each frame's last feature map of the face encoder (cells x channels, float16): "
                        "the spatial tokens that avemo-train --video-stream stt attends over")
    p.add_argument("--no-face-tracking", dest="track_faces", action="store_false", default=None,
                   help="run the full face detector on every sampled frame, not only on keyframes and "
                        "where a face is lost (slower; how caches made before face tracking were made)")
    p.add_argument("--small-face-side", type=int, metavar="PX",
                   help="a video in which no face is found is looked at again with its longer side at up to PX, "
                        "for faces down to 28 px tall (wide shots in HD video; default 1920; 0: no second look). "
                        "Only faceless videos pay for it")
    p.add_argument("--retry-failed", action="store_true", help="extract clips that failed last time again")
    p.add_argument("--clip-timeout", type=float, metavar="S",
                   help="stop a clip (recorded as failed) after S seconds; default 300 s + 4 s per second of media")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0 ok, 1 every clip failed, 2 usage error,
    3 no space left on the cache's disk, 4 the cache is in use by another run)."""
    args = build_parser().parse_args(argv)
    # the first worker imports torch and the extractor while this process does the same
    spare = prestart()
    from extract.cache import CacheBusy, SettingsMismatch
    from extract.run import UsageError, extract_folder
    try:
        manifest = extract_folder(
            args.video_dir, args.out, frames=args.frames, fps=args.fps, label_from=args.label_from,
            labels=args.labels, face_encoder=args.face_encoder, device=args.device, workers=args.workers,
            shard=args.shard, keep_crops=args.keep_crops, feature_maps=args.feature_maps, track_faces=args.track_faces,
            small_face_side=args.small_face_side, retry_failed=args.retry_failed, clip_timeout=args.clip_timeout, progress=not args.quiet, spare=spare)
    except (UsageError, SettingsMismatch, ValueError) as e:
        print(f"avemo-extract: error: {e}", file=sys.stderr)
        return 2
    except NoSpaceError as e:
        print(f"avemo-extract: error: {e.strerror}; every clip finished so far is kept: free some space "
              "and run the same command again to resume", file=sys.stderr)
        return 3
    except CacheBusy as e:
        print(f"avemo-extract: error: {e}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print("avemo-extract: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if not manifest["status"].isin(["ok", "partial"]).any():
        print("avemo-extract: error: no clip could be extracted (see the reasons above and in manifest.csv)",
              file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
