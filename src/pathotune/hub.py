"""The Hugging Face Hub, opt-in: ``hf-hub:owner/repo[@revision][:filename]`` references, downloads through HF's
own cache and uploads (the model card of a shared bundle is :mod:`pathotune.card`).

huggingface_hub does the rest as users expect it: the token (``HF_TOKEN`` or ``hf auth login``),
``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``/``HF_HOME``. Every failure becomes one line naming the repo and what to do.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import PathoTuneError, one_line

HUB_PREFIX = "hf-hub:"
HUB_URL = "https://huggingface.co"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_SYNTAX = "write hf-hub:owner/repo, optionally followed by @revision and :filename"


@dataclass(frozen=True)
class HubRef:
    """A file or repo on the Hub. ``filename`` None: the caller's default files; ``revision`` None: main."""

    repo_id: str
    filename: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        name = f":{self.filename}" if self.filename else ""
        return f"{HUB_PREFIX}{self.repo_id}{rev}{name}"


def is_hub_ref(text: object) -> bool:
    """Whether a weights or bundle argument names the Hub rather than a local path."""
    return str(text).startswith(HUB_PREFIX)


def parse_hub_ref(text: str, error: type[PathoTuneError]) -> HubRef:
    """``hf-hub:owner/repo[@revision][:filename]`` -> HubRef, or one line saying how to write it."""
    body = str(text).removeprefix(HUB_PREFIX)
    repo, colon, filename = body.partition(":")
    repo, at, revision = repo.partition("@")
    if not _REPO_ID.fullmatch(repo) or ".." in repo or (colon and not filename) or (at and not revision):
        raise error(f"'{text}' is not a Hugging Face reference; {_SYNTAX}")
    if filename and (filename.startswith("/") or ".." in filename.split("/")):
        raise error(f"'{text}' names file '{filename}' outside its repo; {_SYNTAX}")
    return HubRef(repo, filename or None, revision or None)


def repo_url(repo_id: str) -> str:
    return f"{HUB_URL}/{repo_id}"


def _offline() -> bool:
    return bool(hf_constants.HF_HUB_OFFLINE)


def _hub_error(ref: HubRef, e: BaseException, what: str, instead: str, error: type[PathoTuneError]) -> PathoTuneError:
    """One line for a failed Hub call: gated, missing, wrong revision, or anything else (network, server)."""
    if isinstance(e, GatedRepoError):
        return error(
            f"Hugging Face repo {ref.repo_id} is gated: accept its terms at {repo_url(ref.repo_id)} and log in "
            f"(`hf auth login` or HF_TOKEN), or {instead}"
        )
    if isinstance(e, RepositoryNotFoundError):
        return error(
            f"Hugging Face repo {ref.repo_id} not found (or private: log in with `hf auth login` or HF_TOKEN); "
            f"check the name, or {instead}"
        )
    if isinstance(e, RevisionNotFoundError):
        return error(f"revision '{ref.revision}' not found in Hugging Face repo {ref.repo_id}; check the @revision")
    return error(f"cannot fetch {what} from Hugging Face repo {ref.repo_id}: {one_line(e, 200)}; retry, or {instead}")


def _not_cached(ref: HubRef, names: Sequence[str], what: str, instead: str, error: type[PathoTuneError]):
    files = ", ".join(names)
    why = "HF_HUB_OFFLINE is set" if _offline() else "the Hub cannot be reached"
    return error(
        f"{what} {ref.repo_id} ({files}) is not in the Hugging Face cache {hf_constants.HF_HUB_CACHE} and {why}; "
        f"download it once with network access, or {instead}"
    )


def download_file(ref: HubRef, defaults: Sequence[str], what: str, instead: str, error: type[PathoTuneError]) -> Path:
    """The local path of ``ref.filename`` (else the first of ``defaults`` the repo holds), from HF's cache or the
    Hub. ``what`` names the thing in messages ("weights", "bundle"); ``instead`` is the local alternative."""
    names = [ref.filename] if ref.filename else list(defaults)
    uncached: list[str] = []
    for name in names:
        try:
            return Path(hf_hub_download(ref.repo_id, name, revision=ref.revision))
        except LocalEntryNotFoundError:  # offline or unreachable, and not in the cache: another name may be
            uncached.append(name)
        except EntryNotFoundError:  # the repo has no such file: try the next default name
            continue
        except Exception as e:  # gated, missing repo or revision, network, server: one line, cause chained
            raise _hub_error(ref, e, what, instead, error) from e
    if uncached:
        raise _not_cached(ref, uncached, what, instead, error)
    raise error(
        f"Hugging Face repo {ref.repo_id} has none of {', '.join(names)}; name the file: "
        f"hf-hub:{ref.repo_id}:<filename>"
    )


def download_folder(ref: HubRef, files: Sequence[str], what: str, instead: str, error: type[PathoTuneError]) -> Path:
    """The snapshot folder holding ``files`` of one revision of the repo (one commit, so the files agree)."""
    try:
        folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=list(files)))
    except LocalEntryNotFoundError as e:
        raise _not_cached(ref, files, what, instead, error) from e
    except Exception as e:
        raise _hub_error(ref, e, what, instead, error) from e
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise error(
            f"Hugging Face repo {ref.repo_id} has no {missing[0]}; it does not hold a pathotune bundle "
            "(push one with PathoTuneModel.push_to_hub)"
        )
    return folder


def _network_failure(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is the network failing: no route, no name resolution, a timeout. Then the
    advice is the network, not the token (huggingface_hub wraps these in its own errors, chained)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        name = type(e).__name__
        if isinstance(e, (ConnectionError, TimeoutError)) or name in _NETWORK_ERRORS:
            return True
        if isinstance(e, OSError) and e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED):
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


# httpx's and requests' names for a failed connection or name lookup (huggingface_hub raises one of the two).
_NETWORK_ERRORS = frozenset({"ConnectError", "ConnectTimeout", "ReadTimeout", "NameResolutionError", "Timeout"})


def upload_folder(
    folder: Path,
    repo_id: str,
    error: type[PathoTuneError],
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload pathotune bundle",
    revision: str | None = None,
    create_pr: bool = False,
) -> str:
    """Create the model repo if needed and upload ``folder`` as one commit (to ``revision``, a branch, or as a
    pull request with ``create_pr``); returns the commit's (or the pull request's) URL."""
    ref = parse_hub_ref(HUB_PREFIX + repo_id, error)
    if ref.filename or ref.revision:
        raise error(f"push to a repo id (owner/repo), not '{repo_id}'; pass a branch as revision")
    if _offline():
        raise error(f"cannot push to Hugging Face repo {repo_id}: HF_HUB_OFFLINE is set; unset it and retry")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=commit_message,
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
        )
    except Exception as e:  # no network, no token, no rights: one line each, cause chained
        if _network_failure(e):
            raise error(
                f"cannot push to Hugging Face repo {repo_id}: network unreachable ({one_line(e, 160)}); check the "
                "connection (or a proxy) and retry"
            ) from e
        raise error(
            f"cannot push to Hugging Face repo {repo_id}: {one_line(e, 200)}; log in (`hf auth login` or HF_TOKEN) "
            "with write access and retry"
        ) from e
    pr = getattr(info, "pr_url", None)
    return str(pr or getattr(info, "commit_url", None) or repo_url(repo_id))
