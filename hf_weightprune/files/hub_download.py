"""Files of a Hub repo fetched into the local Hub cache (`snapshot_download`), only those a reader needs, with
one-line errors that name the repo id and say that no local folder of that name exists either."""

from __future__ import annotations


def download_folder_files(repo_id: str, folders: list[str], *, subfolder: str = "", revision: str | None = None,
                          token: str | bool | None = None, what: str = "files") -> str:
    """Download the files of `repo_id` under `folders` (and the files whose names start with them) into the cache.

    Args:
        repo_id (`str`): a Hub repo id (the caller has checked it is not a local path).
        folders (`list[str]`): folder or file-name prefixes to fetch, e.g. `["importance"]` (`importance/*` and
            `importance*`: named importances too).
        subfolder (`str`, *optional*): a folder inside the repo (`"last-checkpoint"`, `"checkpoint-500"`).
        revision, token: passed to `huggingface_hub.snapshot_download`.
        what (`str`, *optional*): what is fetched, for the error message.

    Returns:
        `str`: the local snapshot folder (the repo's root; join `subfolder` yourself).

    Raises:
        FileNotFoundError: not a valid repo id, not in the cache while offline, or an HTTP error (its status named).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [p for folder in folders for p in (f"{prefix}{folder}/*", f"{prefix}{folder}*")]
    try:
        return snapshot_download(repo_id, revision=revision, token=token, allow_patterns=sorted(set(patterns)))
    except HFValidationError:
        raise FileNotFoundError(f"{repo_id}: no such folder, and not a valid Hub repo id") from None
    except LocalEntryNotFoundError:  # offline, or no network: say that the local folder is missing too
        raise FileNotFoundError(f"{repo_id}: no such local folder, and Hub repo {repo_id} is not in the local cache "
                                "(offline: HF_HUB_OFFLINE=1 or no network); check the path") from None
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        raise FileNotFoundError(f"{repo_id}: no such local folder, and no {what} could be downloaded from Hub repo "
                                f"{repo_id} (HTTP {status})") from None
