from bgwatch.cli import main

raise SystemExit(main())
