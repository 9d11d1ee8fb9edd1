"""The application on top of the library: the demo (``pumit_demo``), its HTML report and the browser
check of that report, and a tour of the universal ViT. Nothing below this package imports it."""
