"""Reading runs back: verification, inspection, plots and the progress measures."""
