"""`python -m fastgpt2` is the `fastgpt2` console script."""
from .cli import main

raise SystemExit(main())
