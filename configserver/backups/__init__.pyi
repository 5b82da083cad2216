# The names configserver.backups exports, and where each lives: the one list. __init__.py reads
# it (lazy_loader.attach_stub) to load each module on first use; type checkers read it as the
# package's types (`X as X`: a stub re-exports only what it names so).
# ruff: noqa: I001 - one import per module, each name `as` itself: isort would split them
from ._asking import (
    Asking as Asking,
)
from ._facts import (
    CertificateFacts as CertificateFacts,
    DeviceFacts as DeviceFacts,
    FactsUnreadable as FactsUnreadable,
    parse_certificate_facts as parse_certificate_facts,
    parse_device_facts as parse_device_facts,
)
from ._schedule import (
    ALL as ALL,
    device_target as device_target,
    is_due as is_due,
    model_target as model_target,
    slot_offset as slot_offset,
    slot_start as slot_start,
)
from ._service import (
    Backups as Backups,
)
from ._store import (
    BackupState as BackupState,
    BackupStore as BackupStore,
    Stored as Stored,
    Version as Version,
)
from ._tables import (
    backup_devices as backup_devices,
)
from ._text import (
    NotText as NotText,
    check_text as check_text,
    content_digest as content_digest,
    decode as decode,
    lines_changed as lines_changed,
    meaningful_lines as meaningful_lines,
    unified_diff as unified_diff,
)
from ._upload import (
    BodyIncomplete as BodyIncomplete,
    BodyTooLarge as BodyTooLarge,
    BodyTooSlow as BodyTooSlow,
    UploadOutcome as UploadOutcome,
    read_body as read_body,
    receive_upload as receive_upload,
    refused_before_reading as refused_before_reading,
)
from ._urls import (
    UnknownUpload as UnknownUpload,
    check_backup_url as check_backup_url,
    upload_kind as upload_kind,
    upload_lines as upload_lines,
    upload_path as upload_path,
)
