from zsad.cli import main

raise SystemExit(main())
