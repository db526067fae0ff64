from resilgate.cli import main

raise SystemExit(main())
