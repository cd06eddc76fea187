# A request hook in Python: `request` is the job's input; `modules` the granted capabilities.
import sys


def handler(request, modules):
    modules.log.info("greeting", name=request.get("name", "world"))
    return {"greeting": f"hello, {request.get('name', 'world')}", "python": sys.version.split()[0]}
