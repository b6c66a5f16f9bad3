from dsedge.cli import main

raise SystemExit(main())
