"""Retrieval: structure-aware chunking, BM25, dense vectors in a memsvc memory, and their fusion."""
from retrievers.base import Chunk, ChunkIndex, Hit, Retriever, Scorer
from retrievers.bm25 import BM25Retriever
from retrievers.chunking import Chunker
from retrievers.dense import DenseIndex, DenseRetriever, SentenceEncoder
from retrievers.hybrid import DEFAULT_FUSION, RRF, HybridRetriever, ScoreFusion

__all__ = ["DEFAULT_FUSION", "RRF", "BM25Retriever", "Chunk", "ChunkIndex", "Chunker", "DenseIndex", "DenseRetriever",
           "Hit", "HybridRetriever", "Retriever", "ScoreFusion", "Scorer", "SentenceEncoder"]
