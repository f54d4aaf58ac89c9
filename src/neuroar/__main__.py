from neuroar.cli import main

raise SystemExit(main())
