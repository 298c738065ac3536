import sys

from tokedge.cli import main

sys.exit(main())
