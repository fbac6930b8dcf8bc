"""Small Hub and disk helpers shared by masks (`SparseMask`) and trained sparse deltas (`MeerkatModel`).

Both artifacts are a pair of files: a data file (safetensors) and a JSON config that records the data
file's SHA-256. They are saved, pushed, downloaded and described the same way, so the plumbing lives here:

* `write_files_atomically` – save a set of files so that a crash never leaves a half-written file under
  its final name; the config (written last) acts as the commit marker.
* `write_directory_atomically` – save a whole artifact (a trained delta: mask + values + config) as ONE
  unit: a new sibling folder renamed into place, the previous version removed only after that succeeded.
* `sha256_bytes` – the hash stored in the config, checked at load time to detect a mismatched pair.
* `resolve_folder` – accept a local directory or a Hub repo id and return a local folder, with error
  messages that say what to do (offline, missing repo, typo in a local path).
* `push_folder` – create the repo if needed and upload a folder in a single commit.
* `render_card` – fill one of the Jinja2 model-card templates shipped in `model_cards/`.

Everything Hub-related goes through `huggingface_hub`; nothing here speaks HTTP itself. It is
imported inside the functions that talk to the Hub (~0.3 s to import its API), so saving and loading
local folders, which every run does, never pays for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from glob import escape as glob_escape
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

__all__ = [
    "DEFAULT_CARD_TAGS",
    "LIBRARY_NAME",
    "push_folder",
    "render_card",
    "resolve_folder",
    "sha256_bytes",
    "write_directory_atomically",
    "write_files_atomically",
]

logger = logging.getLogger(__name__)

#: `library_name` written in the model-card metadata of every artifact we publish.
LIBRARY_NAME = "meerkat-hf"
#: Tags always present in the model-card metadata (callers may add more).
DEFAULT_CARD_TAGS: tuple[str, ...] = ("meerkat", "zeroth-order", "federated-learning", "sparse")

_BytesLike = bytes | bytearray | memoryview


# --------------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------------


def sha256_bytes(data: _BytesLike) -> str:
    """Hex SHA-256 of `data`.

    Callers store it in the JSON config next to the data file so that loading a config with a data file
    from another save (or a corrupted download) fails loudly instead of silently using wrong values.
    """
    return hashlib.sha256(data).hexdigest()


def _check_relative_name(name: str) -> PurePosixPath:
    """Reject absolute names and `..` so a file can never be written outside the target directory."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"File names must be non-empty strings, got {name!r}.")
    rel = PurePosixPath(name.replace(os.sep, "/"))
    if rel.is_absolute() or ".." in rel.parts or Path(name).is_absolute() or Path(name).drive:
        raise ValueError(f"File names must be relative to the target directory, got {name!r}.")
    return rel


def _fsync_directory(directory: Path) -> None:
    """Persist directory entries (renames) on POSIX; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_new_file(path: Path, data: _BytesLike) -> None:
    """Write `data` to a new file (exclusive create, umask-respecting mode), then flush and fsync it.

    `tempfile.mkstemp` is deliberately not used: it creates files with mode 0600, which `os.replace` would
    carry over to the final file.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _backup_existing(target: Path, backup: Path) -> bool:
    """Keep the current content of `target` under `backup` (hard link, copy as fallback). False if none."""
    if not target.exists():
        return False
    try:
        os.link(target, backup)
    except OSError:
        shutil.copy2(target, backup)
    return True


STALE_STAGING_SECONDS = 600  # a staging file this old belongs to a save that was killed, not to one in progress


def _remove_stale_staging(directory: Path, finals: list[Path]) -> None:
    """Remove `.NAME.<token>.tmp/.bak` files that killed saves of these names left behind.

    A kill between staging and cleanup leaves them; nothing reads them (the final names are always
    complete), so they would only pile up. Recent ones are left alone: another process may be saving."""
    now = time.time()
    for final in finals:
        for leftover in final.parent.glob(f".{glob_escape(final.name)}.*"):
            if re.fullmatch(rf"\.{re.escape(final.name)}\.[0-9a-f]{{12}}\.(tmp|bak)", leftover.name) is None:
                continue
            with contextlib.suppress(OSError):
                if now - leftover.stat().st_mtime > STALE_STAGING_SECONDS:
                    leftover.unlink()
                    logger.info("removed %s, left by an interrupted save", leftover)


def write_files_atomically(directory: str | os.PathLike[str], files: Mapping[str, _BytesLike]) -> None:
    """Write several files into `directory` so that readers never see a half-written file.

    Every file is first written to a hidden temporary name in its final directory (same filesystem),
    flushed and fsynced; then each one is moved into place with `os.replace`, **in the order of `files`**.
    Callers put the JSON config that "commits" the save last: a reader that finds the new config also
    finds the new data file.

    On any exception nothing is left behind: temporary files are removed and files already replaced are
    restored from backups (or removed if they did not exist before), so the previous save stays intact.

    Args:
        directory: target directory, created (with parents) if needed.
        files: relative file name (``/``-separated subfolders allowed) -> content.

    Raises:
        ValueError: a name is absolute or escapes `directory` (checked before anything is written).
        Exception: whatever writing raised (e.g. `TypeError` for a non-bytes value, `OSError` for a full
            disk), after cleaning up.
    """
    directory = Path(directory)
    names = {name: _check_relative_name(name) for name in files}  # validate everything before writing
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(directory, [directory.joinpath(*names[n].parts) for n in files])

    token = uuid.uuid4().hex[:12]
    staged: list[tuple[Path, Path]] = []  # (temporary, final) in commit order
    backups: dict[Path, Path] = {}  # final -> backup of its previous content
    replaced: list[Path] = []
    try:
        for name, data in files.items():
            final = directory.joinpath(*names[name].parts)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.{token}.tmp")
            staged.append((tmp, final))
            _write_new_file(tmp, data)
        for tmp, final in staged:
            backup = final.with_name(f".{final.name}.{token}.bak")
            if _backup_existing(final, backup):
                backups[final] = backup
            os.replace(tmp, final)
            replaced.append(final)
        for parent in {final.parent for _, final in staged}:
            _fsync_directory(parent)
    except BaseException:
        for final in reversed(replaced):  # roll back what was already moved into place
            try:
                if final in backups:
                    os.replace(backups.pop(final), final)
                else:
                    final.unlink(missing_ok=True)
            except OSError:
                logger.exception("Could not restore %s after a failed save.", final)
        raise
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        for backup in backups.values():
            with contextlib.suppress(OSError):
                backup.unlink(missing_ok=True)


def _link_tree(src: Path, dst: Path, skip: set[str]) -> None:
    """Recreate `src`'s entries (except the names in `skip`) under `dst`, hard-linking files (copy as fallback)."""
    for entry in os.scandir(src):
        if entry.name in skip:
            continue
        target = dst / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            target.mkdir()
            shutil.copystat(entry.path, target)
            _link_tree(Path(entry.path), target, set())
        else:
            try:
                os.link(entry.path, target)
            except OSError:
                shutil.copy2(entry.path, target)


def _rename(src: Path, dst: Path) -> None:
    """`os.rename` (a seam for tests that simulate a crash between the steps of a directory commit)."""
    os.rename(src, dst)


def write_directory_atomically(directory: str | os.PathLike[str], files: Mapping[str, _BytesLike],
                               *, replace_names: tuple[str, ...] = ()) -> None:
    """Commit `files` into `directory` as ONE unit: readers see the whole previous or the whole new version.

    The new version is assembled in a hidden sibling folder (``.<name>.<token>.tmp``, same filesystem):
    every file of `files` is written and fsynced there, and every other entry already in `directory`
    (tokenizer files, Trainer state, subfolders) is carried over by hard links, except the names in
    `replace_names` (files a previous save of the same kind wrote and this one does not). Then the
    previous directory is renamed aside (``.<name>.<token>.old``), the new one renamed into place, and
    the old one removed only after that succeeded. On an exception everything is rolled back (the old
    directory renamed back, the temporary one removed): no ``.tmp``/``.old`` is left behind and the
    previous save loads as before. A process killed between the two renames leaves the previous
    version intact under ``.<name>.*.old`` (`find_interrupted_save` finds it).
    """
    target = Path(os.path.abspath(os.path.expanduser(os.fspath(directory))))
    if target.is_symlink():
        target = target.resolve()
    names = {name: _check_relative_name(name) for name in files}
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"Cannot save into '{target}': it is a file, not a directory.")
    cwd = Path.cwd().resolve()
    if target.is_dir() and (target.resolve() == cwd or target.resolve() in cwd.parents or os.path.ismount(target)):
        # Renaming the working directory (or a mount point) away is impossible or would strand this process.
        logger.warning("Saving into %s file by file (it is the working directory or a mount point); "
                       "save into a subfolder for a single-rename commit.", target)
        write_files_atomically(target, files)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    token = uuid.uuid4().hex[:12]
    staging = target.with_name(f".{target.name}.{token}.tmp")
    old = target.with_name(f".{target.name}.{token}.old")
    moved_aside = committed = False
    try:
        staging.mkdir()
        for name, data in files.items():
            path = staging.joinpath(*names[name].parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_new_file(path, data)
        if target.is_dir():
            top = {names[n].parts[0] for n in files} | set(replace_names)
            _link_tree(target, staging, top)
            shutil.copystat(target, staging)
        _fsync_directory(staging)
        if target.exists():
            _rename(target, old)
            moved_aside = True
        _rename(staging, target)
        committed = True
        _fsync_directory(target.parent)
    except BaseException:
        if moved_aside and not committed:
            try:
                _rename(old, target)
            except OSError:
                logger.exception("Could not move the previous save back from %s to %s.", old, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if moved_aside:
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(target: Path) -> None:
    """Remove what a killed earlier save left beside `target` (concurrent saves to one folder are unsupported).

    A ``.tmp`` folder is an unfinished new version; an ``.old`` folder is the previous version, kept only
    when `target` itself is missing (then it is the last complete save: it is moved back into place).
    """
    if not target.parent.is_dir():
        return
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    olds = sorted(target.parent.glob(f".{target.name}.*.old"), key=lambda p: p.stat().st_mtime)
    if olds and not target.exists():
        logger.warning("Restoring %s from %s, left by an interrupted save.", target, olds[-1])
        os.rename(olds.pop(), target)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def find_interrupted_save(directory: str | os.PathLike[str]) -> Path | None:
    """The previous version a killed `write_directory_atomically` left beside a now-missing `directory`."""
    target = Path(os.path.abspath(os.path.expanduser(os.fspath(directory))))
    if target.exists() or not target.parent.is_dir():
        return None
    candidates = sorted(target.parent.glob(f".{target.name}.*.old"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


# --------------------------------------------------------------------------------------------------
# Hub: download
# --------------------------------------------------------------------------------------------------


def _client_id() -> dict[str, str]:
    """`library_name`/`library_version` for the Hub client's user agent (downloads are counted per library)."""
    from .. import __version__

    return {"library_name": LIBRARY_NAME, "library_version": __version__}


def _is_repo_id(name: str) -> bool:
    """True if `name` is a syntactically valid Hub repo id (`name` or `namespace/name`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _looks_like_local_path(path_or_repo_id: str | os.PathLike[str]) -> bool:
    """Decide whether a missing `path_or_repo_id` was meant as a local path rather than a Hub repo id.

    Repo ids contain at most one `/` (which is also `os.sep` on POSIX), so "contains a separator" alone
    cannot tell them apart: anything that is a `PathLike`, starts with `.`, `/` or `~`, is absolute, uses a
    Windows separator, or is not a valid repo id is treated as a path.
    """
    if isinstance(path_or_repo_id, os.PathLike):
        return True
    name = str(path_or_repo_id)
    if name.startswith((".", "/", "~")) or os.path.isabs(name):
        return True
    if "\\" in name or (os.sep != "/" and os.sep in name) or (os.altsep and os.altsep != "/" and os.altsep in name):
        return True
    return not _is_repo_id(name)


def hub_check_timeout() -> float:
    """Seconds to wait for the Hub before calling it unreachable (env `MEERKAT_HF_HUB_CHECK_TIMEOUT`, default 5)."""
    try:
        return max(0.1, float(os.environ.get("MEERKAT_HF_HUB_CHECK_TIMEOUT", "5")))
    except ValueError:
        return 5.0


def _hub_unreachable(repo_id: str, revision: str | None, token) -> Exception | None:
    """None if the Hub answers about `repo_id` within `hub_check_timeout()` (whatever the answer), else the error.

    `snapshot_download` waits for long timeouts and retries before it gives up on a silent network;
    one short request first turns that into seconds.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi(token=token).model_info(repo_id, revision=revision or "main", timeout=hub_check_timeout())
    except HfHubHTTPError as err:  # the Hub answered (404, 401, ...): snapshot_download explains it
        return None if getattr(err, "response", None) is not None else err
    except Exception as err:  # noqa: BLE001  (timeouts, DNS, refused connections, proxies)
        return err
    return None


def resolve_folder(
    path_or_repo_id: str | os.PathLike[str],
    *,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Return a local folder holding `path_or_repo_id`: the directory itself, or a Hub snapshot.

    An existing local directory wins (like `from_pretrained` in transformers). Otherwise the argument must
    be a Hub model repo id and is fetched with `huggingface_hub.snapshot_download` (which reuses the cache,
    and works offline for repos downloaded before).

    Args:
        path_or_repo_id: local directory, or a Hub repo id such as ``"org/mask-llama-0.5pct"``.
        revision: branch, tag or commit sha (Hub only; default branch when None).
        allow_patterns: only download files matching these glob patterns (Hub only).
        token: Hub token; None uses the saved/`HF_TOKEN` token.
        cache_dir: Hub cache directory; None uses the default (`HF_HUB_CACHE`).

    Raises:
        FileNotFoundError: it looks like a local path but does not exist.
        NotADirectoryError: it is an existing file, not a directory.
        OSError: the repo is not in the local cache while offline / the Hub is unreachable, or the repo or
            revision does not exist (or is private/gated without a valid token).
    """
    local = Path(os.path.expanduser(os.fspath(path_or_repo_id)))
    if local.is_dir():
        return local
    if local.exists():
        raise NotADirectoryError(f"Expected a directory (or a Hub repo id), got the file '{local}'.")
    if _looks_like_local_path(path_or_repo_id):
        raise FileNotFoundError(
            f"Local directory '{local}' does not exist"
            + ("" if _is_repo_id(os.fspath(path_or_repo_id)) else " (and it is not a valid Hub repo id either)")
            + "."
        )

    repo_id = os.fspath(path_or_repo_id)
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"'{repo_id}' (revision '{revision or 'main'}')"
    if not constants.is_offline_mode():
        unreachable = _hub_unreachable(repo_id, revision, token)
        if unreachable is not None:
            try:  # a repo downloaded before still loads from the cache
                return Path(huggingface_hub.snapshot_download(repo_id=repo_id, revision=revision,
                                                              allow_patterns=allow_patterns, cache_dir=cache_dir,
                                                              repo_type="model", local_files_only=True,
                                                              **_client_id()))
            except Exception:  # noqa: BLE001
                raise OSError(
                    f"{where} is not a local directory and is not in the local Hub cache, and the Hub did not "
                    f"answer within {hub_check_timeout():g} s ({type(unreachable).__name__}). Check the network, "
                    "or pass the path of a local directory instead."
                ) from unreachable
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id=repo_id,
            revision=revision,
            allow_patterns=allow_patterns,
            token=token,
            cache_dir=cache_dir,
            repo_type="model",
            **_client_id(),
        )
    except RevisionNotFoundError as err:
        raise OSError(f"Revision '{revision or 'main'}' does not exist in Hub repo '{repo_id}'.") from err
    except RepositoryNotFoundError as err:  # includes GatedRepoError
        raise OSError(
            f"{where} is neither a local directory nor a Hub repo you can access: the repo does not exist, or "
            "it is private/gated and no valid token was given (run `hf auth login` or pass `token=`)."
        ) from err
    except IncompleteSnapshotError as err:
        raise OSError(
            f"{where} is only partially in the local Hub cache ({err}). Re-run while online to complete it, or "
            "pass the path of a local directory instead."
        ) from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        if (
            constants.is_offline_mode()
            or isinstance(err, OfflineModeIsEnabled)
            or isinstance(err.__cause__, OfflineModeIsEnabled)
        ):
            reason = "Hub access is disabled (HF_HUB_OFFLINE=1)"
        else:
            reason = "the Hub could not be reached"
        raise OSError(
            f"{where} is not a local directory and is not in the local Hub cache, and {reason}. Download it "
            f"once while online (e.g. `hf download {repo_id}` or run this with HF_HUB_OFFLINE=0), or pass the "
            "path of a local directory instead."
        ) from err
    return Path(folder)


# --------------------------------------------------------------------------------------------------
# Hub: upload
# --------------------------------------------------------------------------------------------------


def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    commit_message: str,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload every file of `folder` to the Hub model repo `repo_id` in one commit; return the commit URL.

    The repo is created if missing (`private` only applies then). A `revision` naming a branch that does
    not exist yet is created from the default branch first, so `push_folder(..., revision="v2")` just
    works. With `create_pr=True` the commit goes to a new pull request (and `revision` must be None);
    the returned URL is then the commit on the PR ref and the PR URL is logged.
    """
    from huggingface_hub import HfApi, constants

    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"Cannot push '{folder}': not a directory.")
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision not in (None, constants.DEFAULT_REVISION) and not create_pr and not revision.startswith("refs/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
        repo_type="model",
    )
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    logger.info(
        "Pushed %d file(s) from %s to %s%s: %s (%s)%s",
        len(files),
        folder,
        repo_url,
        f"@{revision}" if revision else "",
        info.commit_url,
        ", ".join(files),
        f"; pull request: {info.pr_url}" if info.pr_url else "",
    )
    return str(info.commit_url)


# --------------------------------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------------------------------


def _template_path(template_name: str) -> Path:
    """Find a card template: installed wheel (`meerkat_hf/model_cards/`) first, then the source checkout."""
    name = template_name if template_name.endswith(".md") else f"{template_name}.md"
    package_dir = Path(__file__).resolve().parents[1]  # meerkat_hf/
    candidates = [package_dir / "model_cards" / name, package_dir.parent / "model_cards" / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Model card template '{name}' not found; looked in: {', '.join(str(c) for c in candidates)}."
    )


#: Card labels for training-summary keys that word-by-word capitalisation gets wrong.
CARD_LABELS: dict[str, str] = {
    "zo_eps": "ZO eps",
    "meerkat_vp_limited_clients": "Meerkat-VP limited clients",
    "num_clients": "Clients",
    "local_steps": "Local steps per round",
    "learning_rate": "Learning rate",
    "full_model_fedavg_bytes": "Full-model FedAvg bytes (same rounds)",
    "communication_reduction": "Communication reduction vs full-model FedAvg",
    "state_digest": "Final state digest",
    "zo_num_perturbations": "ZO perturbations per step",
    "versions": "Library versions (exact reproduction: constraints.txt)",
}
_CARD_WORDS = {"zo": "ZO", "vp": "VP", "fedavg": "FedAvg", "fedzo": "FedZO", "lr": "LR", "auc": "AUC", "f1": "F1",
               "ci": "CI", "id": "ID", "ids": "IDs", "gradip": "GradIP", "lora": "LoRA", "fo": "FO", "iid": "IID",
               "meerkat": "Meerkat", "gguf": "GGUF", "sha256": "SHA-256", "num": "number of", "eps": "eps"}


def card_label(key: str) -> str:
    """A readable label for a summary key: "zo_eps" -> "ZO eps (...)", "macro_f1_after" -> "Macro F1 after"."""
    if key in CARD_LABELS:
        return CARD_LABELS[key]
    words = [_CARD_WORDS.get(w.lower(), w) for w in str(key).replace("-", "_").split("_") if w]
    if not words:
        return str(key)
    first = words[0]
    words[0] = first if first != first.lower() else first[:1].upper() + first[1:]
    return " ".join(words)


def render_card(template_name: str, card_data: Mapping[str, Any], **context: Any) -> ModelCard:
    """Render `model_cards/<template_name>` into a `huggingface_hub.ModelCard`.

    `card_data` becomes the YAML metadata (`ModelCardData` fields: `base_model`, `datasets`, `license`,
    `tags`, ...). Every card gets ``library_name: meerkat-hf`` and the `DEFAULT_CARD_TAGS`; a
    `base_model` that is not a Hub model id (e.g. a local path) is left out of the metadata, where it
    would be invalid, but stays visible in the card body. `context` holds the template variables (see
    the templates in `model_cards/`); None or missing values render as "n/a" or are omitted.

    Returns:
        `huggingface_hub.ModelCard`; `str(card)` is the README.md content, `card.save(path)` writes it.
    """
    from huggingface_hub import ModelCard, ModelCardData

    if isinstance(context.get("training"), Mapping) and "training_labels" not in context:
        context["training_labels"] = {key: card_label(key) for key in context["training"]}
    data: dict[str, Any] = {k: v for k, v in dict(card_data).items() if v is not None}
    data.setdefault("library_name", LIBRARY_NAME)
    given_tags = data.get("tags") or []
    if isinstance(given_tags, str):
        given_tags = [given_tags]
    data["tags"] = list(dict.fromkeys([*DEFAULT_CARD_TAGS, *given_tags]))
    if "base_model" not in data and isinstance(context.get("base_model"), str):
        data["base_model"] = context["base_model"]
    base_model = data.get("base_model")
    if isinstance(base_model, str) and (not _is_repo_id(base_model) or Path(base_model).exists()):
        logger.debug("Not writing base_model=%r to card metadata: not a Hub repo id.", base_model)
        context.setdefault("base_model", base_model)
        del data["base_model"]
    if isinstance(data.get("datasets"), str):
        data["datasets"] = [data["datasets"]]

    return ModelCard.from_template(ModelCardData(**data), template_path=str(_template_path(template_name)), **context)
