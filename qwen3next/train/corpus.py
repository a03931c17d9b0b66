"""The default model's corpus, made from what every Python install has (no download):

  stdlib.jsonl   the standard library's .py sources of the running interpreter (test suites and generated
                 tables left out), one document per module, headed by its path;
  topics.jsonl   the pydoc help topics (`pydoc_data.topics.topics`: the language reference in prose);
  chat.jsonl     synthetic ChatML conversations from docstrings: a user asks about a function, class or method
                 ("What does json.dumps do?") and the assistant answers with its signature and the first paragraph
                 of its docstring, rendered by qwen3next.chat.render_chat; several phrasings, sometimes a system
                 prompt, sometimes two questions in one conversation.

Deterministic for a given seed and Python version. `prepare_dataset` reads the folder (one document per line).
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import random
import re
import sys
import sysconfig

from ..chat import render_chat

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data",
             "lib2to3", "ensurepip", "turtledemo"}
MAX_SOURCE_BYTES = 300_000       # larger files are generated tables or vendored blobs

CHAT_MODULES = (
    "builtins abc argparse array base64 binascii bisect calendar collections collections.abc contextlib copy csv "
    "dataclasses datetime decimal difflib enum fnmatch fractions functools glob gzip hashlib heapq hmac html "
    "inspect io ipaddress itertools json keyword logging math mimetypes operator os os.path pathlib pickle "
    "platform pprint queue random re secrets shlex shutil socket sqlite3 statistics string struct subprocess "
    "tarfile tempfile textwrap threading time timeit tokenize traceback types typing unicodedata urllib.parse "
    "uuid warnings weakref zipfile zlib").split()

QUESTIONS = {
    "function": ("What does {name} do?", "What does `{name}` do in Python?", "Explain {name}.",
                 "How does {name} work?", "Can you tell me what `{name}` is for?", "Briefly describe {name}.",
                 "I'm reading code that calls {name}(). What does it do?", "What is the purpose of {name}?"),
    "class": ("What is {name}?", "What is `{name}` used for?", "Explain the {name} class.",
              "Can you describe the Python class {name}?", "When would I use {name}?"),
}
SYSTEM_PROMPTS = ("You are a helpful assistant.",
                  "You are a concise assistant that answers questions about the Python standard library.",
                  "You are a friendly Python tutor. Answer briefly and precisely.",
                  "You are Qwen, a helpful coding assistant.")
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")


# ---- sources ------------------------------------------------------------------------------------------------------
def stdlib_sources(root: str | None = None) -> list[tuple[str, str]]:
    """(relative path, text) of the stdlib's .py files, sorted, without test suites or generated files."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("test"))
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            if not name.endswith(".py") or name.startswith("test_") or os.path.getsize(path) > MAX_SOURCE_BYTES:
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            if "generated" in text[:600].lower() or not text.strip():
                continue
            out.append((os.path.relpath(path, root).replace(os.sep, "/"), text))
    return out


def pydoc_topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics
    return sorted(topics.items())


# ---- synthetic chat -----------------------------------------------------------------------------------------------
def first_paragraph(doc: str | None) -> str | None:
    """The docstring's first prose paragraph (signature-only lines of C docstrings skipped), or None if too thin."""
    if not isinstance(doc, str) or not doc:
        return None
    for para in inspect.cleandoc(doc).split("\n\n"):
        lines = [ln.strip() for ln in para.strip().splitlines() if ln.strip()]
        if not lines or all(_SIGNATURE_LINE.match(ln) for ln in lines):
            continue
        text = " ".join(lines)
        return text if 20 <= len(text) <= 700 else None
    return None


def documented_objects(module_names=CHAT_MODULES) -> list[tuple[str, str, str, str]]:
    """(qualified name, kind, signature or "", first paragraph) for the public functions, classes and methods of
    `module_names`, each object once, in a fixed order."""
    seen, out = set(), []
    for mod_name in module_names:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        prefix = "" if mod_name == "builtins" else mod_name + "."
        for attr in sorted(a for a in vars(mod) if not a.startswith("_")):
            obj = getattr(mod, attr)
            if inspect.ismodule(obj) or not callable(obj) or not _belongs(mod, attr, obj):
                continue
            for qualname, member in [(prefix + attr, obj)] + _methods(prefix + attr, obj):
                if id(member) in seen:
                    continue
                seen.add(id(member))
                para = first_paragraph(getattr(member, "__doc__", None))
                if para:
                    kind = "class" if inspect.isclass(member) else "function"
                    out.append((qualname, kind, _signature(member), para))
    return out


def _belongs(mod, attr: str, obj) -> bool:
    """Part of the module's own API: listed in __all__, or defined there (or in its C accelerator `_name`),
    not something it merely imported (pathlib's S_ISSOCK comes from stat)."""
    if mod.__name__ == "builtins":
        return True
    if hasattr(mod, "__all__"):
        return attr in mod.__all__
    home = getattr(obj, "__module__", None) or ""
    return home == mod.__name__ or home == "_" + mod.__name__.rsplit(".", 1)[-1]


def _methods(qualname: str, obj) -> list[tuple[str, object]]:
    if not inspect.isclass(obj):
        return []
    return [(f"{qualname}.{n}", m) for n, m in sorted(vars(obj).items())
            if not n.startswith("_") and callable(m) and not inspect.isclass(m)]


def _signature(obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    return sig if len(sig) <= 160 else ""


def chat_conversations(objects, rng: random.Random, phrasings: int = 2) -> list[str]:
    """`phrasings` conversations per documented object; a quarter of them get a second question."""
    texts = []
    for i, item in enumerate(objects):
        for _ in range(phrasings):
            messages = []
            if rng.random() < 0.35:
                messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            messages += _turn(item, rng)
            if rng.random() < 0.25:
                messages += _turn(objects[rng.randrange(len(objects))], rng)
            texts.append(render_chat(messages, add_generation_prompt=False))
    return texts


def _turn(item, rng: random.Random) -> list[dict]:
    name, kind, sig, para = item
    question = rng.choice(QUESTIONS[kind]).format(name=name)
    if sig and rng.random() < 0.7:
        answer = f"`{name}{sig}`\n\n{para}"
    else:
        answer = f"`{name}`: {para}" if rng.random() < 0.5 else para
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# ---- the folder ---------------------------------------------------------------------------------------------------
def build_corpus(out_dir: str, seed: int = 0, phrasings: int = 4, stdlib_root: str | None = None) -> dict:
    """Write stdlib.jsonl, topics.jsonl and chat.jsonl (+ corpus.json, the manifest) into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    parts = {
        "stdlib": [f"# {path}\n{text}" for path, text in stdlib_sources(stdlib_root)],
        "topics": [f"{name}\n{'=' * len(name)}\n\n{text.strip()}\n" for name, text in pydoc_topics()],
        "chat": chat_conversations(documented_objects(), rng, phrasings),
    }
    manifest = {"python": sys.version.split()[0], "seed": seed, "files": {}}
    for name, docs in parts.items():
        path = os.path.join(out_dir, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for text in docs:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        manifest["files"][f"{name}.jsonl"] = {"documents": len(docs),
                                               "mb": round(sum(len(t.encode()) for t in docs) / 1e6, 2)}
    manifest["total_mb"] = round(sum(v["mb"] for v in manifest["files"].values()), 2)
    with open(os.path.join(out_dir, "corpus.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest
