from wirechat.cli import main

raise SystemExit(main())
