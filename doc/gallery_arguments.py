"""Command-line arguments that the documentation build passes to the gallery examples."""

from pathlib import Path

# Figures that an example saves itself go to the build folder, not into examples/.
OUTPUT_DIR = Path(__file__).resolve().parent / "_build" / "gallery_output"


def reset_argv(gallery_conf, script_vars):
    """Return the arguments after the script name for the example ``script_vars['src_file']``.

    The CNN example runs with its defaults, except that its figure is written to the build
    folder and its progress bars, which would go to the build log, are hidden.
    """
    if Path(script_vars["src_file"]).name == "plot_compress_cnn.py":
        return ["--output", str(OUTPUT_DIR), "--quiet"]
    return []
