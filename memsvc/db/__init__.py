"""The SQL catalog (SQLAlchemy 2 + alembic): which memories exist and how they are configured."""
from memsvc.db.catalog import Catalog

__all__ = ["Catalog"]
