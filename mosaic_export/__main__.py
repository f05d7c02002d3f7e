import sys

from mosaic_export.cli import main

sys.exit(main())
