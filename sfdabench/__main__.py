from sfdabench.cli import main

raise SystemExit(main())
