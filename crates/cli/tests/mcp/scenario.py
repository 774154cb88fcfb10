"""An agent's whole session with Hangar's MCP server, driven by the official
MCP Python SDK: create a machine, write a program into it, run it,
checkpoint, break it, diff, restore, fork, destroy. Every step checks what
came back; any failure raises, and the exit status says so.

Usage: scenario.py stdio HANGAR_BINARY | http URL   (HANGAR_URL, HANGAR_TOKEN,
HANGAR_IMAGE in the environment) [--mode legacy|auto]
"""

import asyncio
import json
import os
import sys
import urllib.request

from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

CORE_TOOLS = {
    "create_machine", "start_machine", "stop_machine", "destroy_machine", "list_machines", "exec",
    "write_file", "read_file", "create_checkpoint", "diff_checkpoint", "restore_checkpoint", "fork_machine",
}

PROGRAM = """#!/bin/sh
echo "hello from $1"
"""


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}", flush=True)


def structured(result, what):
    if result.is_error:
        raise AssertionError(f"{what} failed: {result.content}")
    data = result.structured_content
    # The text block carries the same JSON, for clients without structured output.
    check(json.loads(result.content[0].text) == data, f"{what}: text block matches structured content")
    return data


def create_elsewhere(name):
    """Creates a machine through the REST API, as another agent would."""
    body = json.dumps({"name": name, "skip_launch": True, "config": {"image": os.environ["HANGAR_IMAGE"]}})
    req = urllib.request.Request(f"{os.environ['HANGAR_URL']}/v1/apps/default/machines", data=body.encode(),
                                 headers={"Authorization": f"Bearer {os.environ['HANGAR_TOKEN']}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        return json.load(resp)["id"]


async def watch_resources(client, name):
    """2026-07-28's subscriptions/listen: a machine made by someone else changes the resource list."""
    async with client.listen(resources_list_changed=True) as sub:
        check(sub.honored.resources_list_changed, "the server honors resources_list_changed")
        other = await asyncio.to_thread(create_elsewhere, f"{name}-elsewhere")
        event = await asyncio.wait_for(sub.__anext__(), 10)
        check("resources" in type(event).__name__.lower() or "resources/list_changed" in repr(event),
              f"the listener hears of the new machine ({event!r})")
    uris = {str(r.uri) for r in (await client.list_resources(cache_mode="refresh")).resources}
    check(f"hangar://apps/default/machines/{other}/logs" in uris, "and the list has it")
    structured(await client.call_tool("destroy_machine", {"machine_id": other}), "destroy the other machine")


async def scenario(client, label, mode, notes):
    tools = {t.name: t for t in (await client.list_tools()).tools}
    check(CORE_TOOLS <= tools.keys(), f"core tools listed ({sorted(CORE_TOOLS - tools.keys())} missing)")
    for t in tools.values():
        check(t.description and len(t.description) > 40, f"{t.name} has a description")
        check(t.input_schema.get("type") == "object", f"{t.name} has an input schema")
        check(t.output_schema is not None, f"{t.name} has an output schema")
    check("machine_id" in tools["exec"].input_schema["properties"], "exec takes machine_id")

    image = os.environ["HANGAR_IMAGE"]
    name = f"mcp-{label}"
    call = client.call_tool
    m = structured(await call("create_machine", {"image": image, "name": name, "cmd": ["sleep", "infinity"]}),
                   "create_machine")
    check(m["state"] == "started" and m["app"] == "default", "the machine is started in app default")
    mid = m["id"]

    listed = structured(await call("list_machines", {}), "list_machines")
    check(any(x["id"] == mid for x in listed["machines"]), "list_machines shows it")

    info = structured(await call("write_file", {"machine_id": name, "path": "/work/hello.sh",
                                                "content": PROGRAM, "mode": "755"}), "write_file")
    check(info["size"] == len(PROGRAM) and info["mode"] & 0o777 == 0o755, "the program is written, mode 755")
    back = structured(await call("read_file", {"machine_id": name, "path": "/work/hello.sh"}), "read_file")
    check(back["content"] == PROGRAM, "read_file returns what was written")

    ran = structured(await call("exec", {"machine_id": name, "command": ["/work/hello.sh", "agent"]}), "exec")
    check(ran["exit_code"] == 0 and ran["stdout"] == "hello from agent\n", "the program runs")

    # A long command with a progress token: its output arrives while it runs.
    progress = []

    async def on_progress(done, total, message):
        progress.append(message)

    script = "for i in 1 2 3; do echo step $i; sleep 0.3; done; echo oops >&2; exit 4"
    ran = structured(await call("exec", {"machine_id": name, "command": ["sh", "-c", script]},
                                progress_callback=on_progress), "exec with progress")
    check(ran["exit_code"] == 4 and ran["stdout"] == "step 1\nstep 2\nstep 3\n" and ran["stderr"] == "oops\n",
          "streamed exec returns exit code and both streams")
    check(len(progress) >= 2 and "step 1" in progress, f"progress notifications carried output ({progress})")

    ck = structured(await call("create_checkpoint", {"machine_id": name, "comment": "works"}), "create_checkpoint")
    ck_id = ck["id"]

    # Break it.
    structured(await call("write_file", {"machine_id": name, "path": "/work/hello.sh",
                                         "content": "#!/bin/sh\nexit 3\n", "mode": "755"}), "break the program")
    structured(await call("write_file", {"machine_id": name, "path": "/work/junk", "content": "x"}), "add junk")
    ran = structured(await call("exec", {"machine_id": name, "command": ["/work/hello.sh", "agent"]}), "exec broken")
    check(ran["exit_code"] == 3, "the broken program fails")
    listing = structured(await call("list_files", {"machine_id": name, "path": "/work"}), "list_files")
    check(sorted(e["path"].rsplit("/", 1)[-1] for e in listing["entries"]) == ["hello.sh", "junk"],
          f"list_files shows both files ({listing['entries']})")
    checkpoints = structured(await call("list_checkpoints", {"machine_id": name}), "list_checkpoints")
    check([c["comment"] for c in checkpoints["checkpoints"]] == ["works"], "list_checkpoints has the checkpoint")

    diff = structured(await call("diff_checkpoint", {"machine_id": name, "checkpoint_id": ck_id,
                                                     "path": "/work/hello.sh"}), "diff_checkpoint")
    kinds = {c["path"]: c["kind"] for c in diff["changes"]}
    check(kinds.get("/work/hello.sh") == "modified" and kinds.get("/work/junk") == "added",
          f"the diff shows the change and the junk ({kinds})")
    check('-echo "hello from $1"' in diff["content_diff"] and "+exit 3" in diff["content_diff"],
          "the diff has the file's unified diff")

    structured(await call("restore_checkpoint", {"machine_id": name, "checkpoint_id": ck_id}), "restore_checkpoint")
    ran = structured(await call("exec", {"machine_id": name, "command": ["/work/hello.sh", "again"]}),
                     "exec restored")
    check(ran["stdout"] == "hello from again\n", "the restored program works")
    ran = structured(await call("exec", {"machine_id": name, "command": ["ls", "/work"]}), "ls restored")
    check(ran["stdout"] == "hello.sh\n", "the junk is gone")

    fork = structured(await call("fork_machine", {"machine_id": name, "name": f"{name}-fork"}), "fork_machine")
    ran = structured(await call("exec", {"machine_id": fork["id"], "command": ["/work/hello.sh", "fork"]}),
                     "exec in fork")
    check(ran["stdout"] == "hello from fork\n", "the fork has the program")
    structured(await call("remove_file", {"machine_id": fork["id"], "path": "/work/hello.sh"}), "remove_file")
    err = await call("read_file", {"machine_id": fork["id"], "path": "/work/hello.sh"})
    check(err.is_error, "a removed file is gone from the fork")
    structured(await call("write_file", {"machine_id": fork["id"], "path": "/work/only-fork", "content": "f"}),
               "write in fork")
    ran = structured(await call("exec", {"machine_id": name, "command": ["ls", "/work"]}), "ls parent")
    check(ran["stdout"] == "hello.sh\n", "the parent does not see the fork's file")

    # Resources: the machine's log and a file.
    resources = (await client.list_resources()).resources
    uris = {str(r.uri) for r in resources}
    logs_uri = f"hangar://apps/default/machines/{mid}/logs"
    check(logs_uri in uris, "the machine's log is a resource")
    text = (await client.read_resource(logs_uri)).contents[0].text
    check(isinstance(text, str), "its log reads as text")
    logs = structured(await call("get_logs", {"machine_id": name, "tail_bytes": 100}), "get_logs")
    check(isinstance(logs["text"], str) and len(logs["text"]) <= 100, "get_logs returns the log's end")
    file = (await client.read_resource(f"hangar://apps/default/machines/{mid}/files/work/hello.sh")).contents[0]
    check(file.text == PROGRAM, "a file reads as a resource")

    if mode != "legacy":
        await watch_resources(client, name)
    else:
        check(any("ResourceListChanged" in n for n in notes),
              "older protocols hear of new machines through notifications/resources/list_changed")

    # Images and volumes.
    if os.environ.get("HANGAR_PULL_IMAGE"):
        steps = []

        async def on_pull(done, total, message):
            steps.append((done, total))

        reference = os.environ["HANGAR_PULL_IMAGE"]
        pulled = structured(await call("pull_image", {"image": reference}, progress_callback=on_pull),
                            "pull_image from a registry")
        check(pulled["reference"] == reference, "the registry image is pulled")
        # Progress in bytes; a second pull of the same image has less or nothing left to download.
        check(steps and all(t is None or d <= t for d, t in steps), f"the pull reported progress ({steps[-3:]})")
    pulled = structured(await call("pull_image", {"image": image}), "pull_image")
    check(pulled["digest"].startswith("sha256:"), "pull_image returns the image")
    images = structured(await call("list_images", {}), "list_images")
    check(any(i["digest"] == pulled["digest"] for i in images["images"]), "list_images shows it")
    vol = structured(await call("create_volume", {"name": f"{name}-vol", "size_gb": 1}), "create_volume")
    listed = structured(await call("list_volumes", {}), "list_volumes")
    check(any(v["id"] == vol["id"] for v in listed["volumes"]), "list_volumes shows it")
    gone = structured(await call("delete_volume", {"volume_id": vol["id"]}), "delete_volume")
    check(gone["state"] == "pending_destroy", "a deleted volume is recoverable until purged")

    # Apps, suspend and wait.
    structured(await call("create_app", {"app": f"{name}-app"}), "create_app")
    apps = structured(await call("list_apps", {}), "list_apps")
    check({"default", f"{name}-app"} <= {a["name"] for a in apps["apps"]}, "list_apps shows both apps")
    m = structured(await call("suspend_machine", {"machine_id": name}), "suspend_machine")
    check(m["state"] == "suspended", "suspend_machine suspends")
    structured(await call("start_machine", {"machine_id": name}), "resume")
    m = structured(await call("wait_machine", {"machine_id": name, "state": "started", "timeout": 10}), "wait_machine")
    check(m["state"] == "started", "wait_machine returns the machine once started")

    # Errors a model can act on.
    structured(await call("stop_machine", {"machine_id": name}), "stop_machine")
    err = await call("exec", {"machine_id": name, "command": ["true"]})
    check(err.is_error and "start_machine" in err.content[0].text, f"exec on a stopped machine says what to do ({err.content[0].text})")
    err = await call("get_machine", {"machine_id": "no-such-machine"})
    check(err.is_error and "list_machines" in err.content[0].text, "an unknown machine points at list_machines")
    err = await call("read_file", {"machine_id": name, "path": "relative"})
    check(err.is_error, "bad input is a tool error")
    m = structured(await call("start_machine", {"machine_id": name}), "start_machine")
    check(m["state"] == "started", "start brings it back")
    ran = structured(await call("exec", {"machine_id": name, "command": ["/work/hello.sh", "x"]}), "exec after start")
    check(ran["stdout"] == "hello from x\n", "its files survived the stop")

    for target in (name, f"{name}-fork"):
        structured(await call("destroy_machine", {"machine_id": target, "force": True}), f"destroy {target}")
    listed = structured(await call("list_machines", {}), "list_machines after destroy")
    check(all(x["id"] != mid for x in listed["machines"]), "the machine is gone")
    print(f"scenario passed ({label})", flush=True)


async def main():
    transport, where = sys.argv[1], sys.argv[2]
    mode = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--mode" else "auto"
    label = f"{transport}-{mode}"
    if transport == "stdio":
        env = {k: os.environ[k] for k in ("HANGAR_URL", "HANGAR_TOKEN", "PATH")}
        server = StdioServerParameters(command=where, args=["mcp"], env=env)
    else:
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {os.environ['HANGAR_TOKEN']}"})
        server = streamable_http_client(where, http_client=http)
    notes = []

    async def on_message(message):
        notes.append(type(message).__name__ + repr(message))

    async with Client(server, mode=mode, message_handler=on_message) as client:
        await scenario(client, label, mode, notes)


asyncio.run(main())
