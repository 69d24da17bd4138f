"""`python -m router` is `dicom-router`."""

from router.cli import main

main()
