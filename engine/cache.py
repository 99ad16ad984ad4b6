"""A folder of saved inversions (--cache) that several runs can share: each entry is claimed by one run at a time.

Entry KEY.safetensors (+ KEY.json) where KEY = artifact.inversion_key(pixels, prompt, model, settings). A run that
needs an entry claims KEY.lock with an exclusive fcntl lock; another run that needs the same entry meanwhile works on
its other entries and then waits for it, and finds it saved. A lock dies with its process (the kernel drops it), so
a killed run leaves no stale claim. Entries are written atomically; one that cannot be read (damaged, cut short,
another format, another key) is moved aside to KEY.safetensors.corrupt with a warning and computed again.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .artifact import Inversion, NewerFormat, check_inversion, inversion_key, load_inversion, save_inversion
from .config import NTIConfig, NTIError

log = logging.getLogger("nti")

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs sharing a cache may then repeat work (never corrupt it)
    fcntl = None

POLL_S = 0.5  # how often a run waiting for another run's entries looks again


class Claim:
    """An exclusive claim on one cache entry: KEY.lock held with flock, removed on release."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def try_acquire(self) -> bool:
        if fcntl is None:
            return True
        while True:
            # 0o666 less the umask, as any new file: with 0o644 the users of a group-shared cache (umask 002) could not
            # open each other's claims ("cannot create a lock file"), though the folder let them write entries
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            # the holder before us may have removed the file after we opened it: then our lock guards nothing
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                os.write(fd, f"{os.getpid()}\n".encode())
                return True
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: nobody can hold a lock on the removed file
            os.close(self.fd)
            self.fd = None


def entry_path(cache: Path, key: str) -> Path:
    return cache / f"{key}.safetensors"


def read_entry(path: Path, key: str, quarantine: bool, newer: set | None = None) -> Inversion | None:
    """The saved inversion at path, or None when there is none or it is unusable (moved aside if `quarantine`,
    which only the run holding the entry's claim does). An entry a newer nti wrote is not damaged: it stays, its
    path goes into `newer`, and the caller inverts again without saving over it (a cache shared by two versions)."""
    if not path.is_file():
        return None
    try:
        inv = load_inversion(path)
        if inv.key != key:
            raise NTIError(f"it holds the inversion {inv.key}, not {key}")
        return inv
    except NewerFormat as err:
        if newer is not None:
            newer.add(path)
            log.warning("%s; left in place for it: inverting this image again without saving over it", err)
        return None
    except NTIError as err:
        if quarantine:
            aside = path.with_name(path.name + ".corrupt")
            try:
                os.replace(path, aside)
                path.with_suffix(".json").unlink(missing_ok=True)
            except OSError:
                pass
            log.warning("cache entry %s is unusable (%s); moved aside to %s, inverting again", path, err, aside.name)
        return None


def invert_through_cache(pipe, squares: list, prompts: list[str], config: NTIConfig, cache, progress: bool,
                         invert) -> list[Inversion]:
    """The cache's part of api.invert_cached, for images already loaded and prompts already checked: `invert` (api's)
    runs only for entries no run has saved, claimed one by one (see the module docstring)."""
    from .images import pixel_hash

    pairs = [(pixel_hash(sq), p) for sq, p in zip(squares, prompts)]
    first = {}  # (pixels, prompt) -> index of its first job
    for k, pair in enumerate(pairs):
        first.setdefault(pair, k)
    unique = sorted(set(first.values()))
    chunk = config.model_batch
    results: dict[int, Inversion] = {}

    def run(indices: list[int], on_done) -> None:
        for start in range(0, len(indices), chunk):
            part = indices[start:start + chunk]
            for k, inv in zip(part, invert(pipe, [squares[k] for k in part], [prompts[k] for k in part], config,
                                           progress)):
                results[k] = inv
                on_done(k, inv)
            if progress and len(indices) > chunk:
                log.info("inverted %d/%d images", min(start + chunk, len(indices)), len(indices))

    if cache is None:
        run(unique, lambda k, inv: None)
    else:
        cache = Path(cache).expanduser()
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise NTIError(f"--cache {cache}: cannot create the folder ({err.strerror or err})") from None
        settings = config.result_settings(pipe.scheduler_config)
        keys = {k: inversion_key(pairs[k][0], pairs[k][1], pipe.fingerprint, settings) for k in unique}
        pending = []
        for k in unique:  # entries are written atomically, so reading without a claim sees whole files only
            inv = read_entry(entry_path(cache, keys[k]), keys[k], quarantine=False)
            if inv is None:
                pending.append(k)
            else:
                results[k] = inv
        claims: dict[int, Claim] = {}
        newer: set = set()  # entries a newer nti wrote: kept as they are

        def save_and_release(k: int, inv: Inversion) -> None:
            try:
                check_inversion(inv)
            except NTIError:  # a diverged result is reported by the caller; it must not be served again
                pass
            else:
                if entry_path(cache, keys[k]) not in newer:
                    save_inversion(inv, entry_path(cache, keys[k]))
            claims.pop(k).release()

        waited = False
        try:
            while pending:
                mine = []
                for k in pending:
                    claim = Claim(cache / f"{keys[k]}.lock")
                    try:
                        got = claim.try_acquire()
                    except OSError as err:
                        raise NTIError(f"--cache {cache}: cannot create a lock file ({err.strerror or err})") from None
                    if not got:
                        continue
                    inv = read_entry(entry_path(cache, keys[k]), keys[k], quarantine=True, newer=newer)
                    if inv is not None:  # another run saved it meanwhile
                        results[k] = inv
                        claim.release()
                    else:
                        claims[k] = claim
                        mine.append(k)
                run(mine, save_and_release)
                pending = [k for k in pending if k not in results]
                if pending and not mine:
                    if not waited:
                        log.info("waiting for another run that is inverting %d of these images into %s",
                                 len(pending), cache)
                        waited = True
                    time.sleep(POLL_S)
        finally:
            for claim in claims.values():
                claim.release()
    return [results[first[pair]] for pair in pairs]
