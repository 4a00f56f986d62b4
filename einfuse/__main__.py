import sys

from einfuse.cli import main

sys.exit(main())
