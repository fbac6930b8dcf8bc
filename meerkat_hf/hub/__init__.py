"""Files and the Hub: atomic saves, upload/download, model cards (`artifacts`), base-model loading
(`loading`), safetensors bytes without torch's allocator (`safetensors_bytes`), reading untrusted files
(`integrity`), finding published masks (`discovery`)."""

from .artifacts import (
    DEFAULT_CARD_TAGS,
    LIBRARY_NAME,
    push_folder,
    render_card,
    resolve_folder,
    sha256_bytes,
    write_directory_atomically,
    write_files_atomically,
)
from .discovery import list_masks, mask_repo_name

__all__ = ["DEFAULT_CARD_TAGS", "LIBRARY_NAME", "list_masks", "mask_repo_name", "push_folder", "render_card", "resolve_folder", "sha256_bytes",
           "write_directory_atomically", "write_files_atomically"]
