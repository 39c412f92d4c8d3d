"""The contract floor: the types, checks, wire format and errors every side of memsvc shares.

It imports nothing above it (no FAISS, SQL, torch or HTTP), so the light client, the store, the model
side and the server all build on it.
"""
from memsvc.contract.checks import (
                                    DEVICE_TYPES,
                                    MAX_EF_SEARCH,
                                    MAX_K,
                                    MAX_NORM,
                                    MAX_NPROBE,
                                    MAX_PARTITION_LEN,
                                    MIN_NORM,
                                    check_device,
                                    check_ids,
                                    check_json,
                                    check_k,
                                    check_keys,
                                    check_partition,
                                    check_partitions,
                                    check_payloads,
                                    check_search_params,
                                    check_unicode,
                                    check_values,
                                    check_vectors,
                                    invalid_input,
                                    lone_surrogate,
                                    parse_device,
                                    partition_groups,
)
from memsvc.contract.client import Client, CollectionBackend, MemoriesClient
from memsvc.contract.collections import (
                                    COLLECTION_NAME,
                                    MAX_DOCUMENT_BYTES,
                                    MAX_DOCUMENT_ID,
                                    MEMORY_PREFIX,
                                    SEARCH_MODES,
                                    Answer,
                                    AnswerStream,
                                    Citation,
                                    CollectionStats,
                                    Document,
                                    DocumentHit,
                                    SearchMode,
                                    UpsertResult,
                                    as_documents,
                                    check_collection_name,
                                    check_document_id,
)
from memsvc.contract.errors import (
                                    AlreadyExists,
                                    BackendUnavailable,
                                    CorruptLog,
                                    CorruptSnapshot,
                                    DataDirInUse,
                                    Forbidden,
                                    InvalidInput,
                                    MemoryUnavailable,
                                    MemsvcError,
                                    ModelLoading,
                                    NotFound,
                                    ServerUnavailable,
                                    StorageFull,
                                    TooLarge,
                                    Unauthorized,
                                    UnsupportedMediaType,
                                    error_from_dict,
)
from memsvc.contract.spec import (
                                    NAME_PATTERN,
                                    IndexKind,
                                    MemorySpec,
                                    Metric,
                                    ValueKind,
                                    default_pq_m,
                                    spec_from,
)
from memsvc.contract.types import Entries, MemoryBackend, MemoryStats, Partition, SearchResult

__all__ = [
    "COLLECTION_NAME", "DEVICE_TYPES", "MAX_DOCUMENT_BYTES", "MAX_DOCUMENT_ID", "MAX_EF_SEARCH", "MAX_K",
    "MAX_NORM", "MAX_NPROBE", "MAX_PARTITION_LEN", "MEMORY_PREFIX", "MIN_NORM", "NAME_PATTERN", "SEARCH_MODES",
    "AlreadyExists", "Answer", "AnswerStream", "BackendUnavailable", "Citation", "Client", "CollectionBackend",
    "CollectionStats", "CorruptLog", "CorruptSnapshot", "DataDirInUse", "Document", "DocumentHit", "Entries",
    "Forbidden", "IndexKind", "InvalidInput", "MemoriesClient", "MemoryBackend", "MemorySpec", "MemoryStats",
    "MemoryUnavailable", "MemsvcError", "Metric", "ModelLoading", "NotFound", "Partition", "SearchMode",
    "SearchResult", "ServerUnavailable", "StorageFull", "TooLarge", "Unauthorized", "UnsupportedMediaType",
    "UpsertResult", "ValueKind", "as_documents", "check_collection_name", "check_device", "check_document_id",
    "check_ids", "check_json", "check_k", "check_keys", "check_partition", "check_partitions", "check_payloads",
    "check_search_params", "check_unicode", "check_values", "check_vectors", "default_pq_m", "error_from_dict",
    "invalid_input", "lone_surrogate", "parse_device", "partition_groups", "spec_from",
]
