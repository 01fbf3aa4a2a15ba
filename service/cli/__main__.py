import sys

from exitserve.service.cli.main import main

sys.exit(main())
