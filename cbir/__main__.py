import sys

from cbir.cli.main import main

sys.exit(main())
