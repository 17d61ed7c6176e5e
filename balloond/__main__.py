import sys

from .services.daemon import main

sys.exit(main())
