import sys

from lfm_engine.cli import main

sys.exit(main())
