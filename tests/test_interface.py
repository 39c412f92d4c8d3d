"""One client interface, two faces: every call of the floor's protocols exists on each implementation with
the same parameters and defaults, so code written against `Client` runs embedded or over REST unchanged
(what the calls do is tested on both faces by test_backend, test_collections and test_api)."""
from __future__ import annotations

import inspect

import pytest

from memsvc.client import MemoryClient, RemoteCollection, RemoteMemory
from memsvc.collections import Collection
from memsvc.contract import Client, CollectionBackend, MemoryBackend
from memsvc.service import Service
from memsvc.store import Memory
from memsvc.store.milvus import MilvusMemory


def calls(protocol: type) -> dict[str, inspect.Signature]:
    """The protocol's methods (its own and inherited ones) and their signatures."""
    own = {name: value for klass in protocol.__mro__ if klass.__module__.startswith("memsvc.contract")
           for name, value in vars(klass).items()
           if callable(value) and (not name.startswith("_") or name in ("__enter__", "__exit__"))}
    return {name: inspect.signature(value) for name, value in sorted(own.items())}


def shape(signature: inspect.Signature) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


@pytest.mark.parametrize("protocol, faces", [
    (Client, (Service, MemoryClient)),
    (CollectionBackend, (Collection, RemoteCollection)),
    (MemoryBackend, (Memory, RemoteMemory, MilvusMemory)),
])
def test_every_face_has_every_call_with_the_same_parameters(protocol, faces):
    expected = calls(protocol)
    assert len(expected) >= 6
    for face in faces:
        for name, signature in expected.items():
            assert hasattr(face, name), f"{face.__name__} lacks {name}"
            assert shape(inspect.signature(getattr(face, name))) == shape(signature), f"{face.__name__}.{name}"
