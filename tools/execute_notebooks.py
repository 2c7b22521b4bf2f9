"""Execute notebooks in place (outputs saved), like CI's nbval run does."""
import sys, time
import nbformat
from nbclient import NotebookClient
for path in sys.argv[1:]:
    nb = nbformat.read(path, as_version=4)
    t = time.time()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(__import__("pathlib").Path(path).parent)}}).execute()
    nbformat.write(nb, path)
    print(path, f"{time.time()-t:.1f}s")
