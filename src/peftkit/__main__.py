import sys

from peftkit.cli.main import main

sys.exit(main())
