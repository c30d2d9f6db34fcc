"""The files of a report: its JSON, its markdown and any figures or tables drawn from it, written
next to each other (every report and tool of the harness writes through here)."""
import json
import os


def _write_text(path, text):
    # Write then rename: an interrupted run leaves the previous file, never half of one.
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report_files(report, output_dir, markdown, files=None, stem="results"):
    """``{stem}.json`` (``report``), ``{stem}.md`` (``markdown(report)``) and one file per ``files``
    entry ({file name: write(report, path)}, e.g. a PNG plot) in ``output_dir``; their paths."""
    files = files or {}
    os.makedirs(output_dir, exist_ok=True)
    paths = {name: os.path.join(output_dir, name)
             for name in (f"{stem}.json", f"{stem}.md", *files)}
    _write_text(paths[f"{stem}.json"], json.dumps(report, indent=1))
    _write_text(paths[f"{stem}.md"], markdown(report))
    for name, write in files.items():
        write(report, paths[name])
    return paths
