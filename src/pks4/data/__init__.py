"""Video -> frames -> clips. Importing the package registers every dataset format defined outside
:mod:`pks4.data.datasets` (caption files, the long-term benchmarks), so ``DataConfig(format=...)`` knows them
whichever module of the package is imported first."""
from . import captions, longterm  # noqa: F401 - registered formats
