from hpcrollout.cli import main

raise SystemExit(main())
