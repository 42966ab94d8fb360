import subprocess, sys, os, json, time
T = sys.argv[1]; extra = sys.argv[2:]
env = {k: v for k, v in os.environ.items() if not k.startswith("PUNIE_")}
env.update(PUNIE_DATA_DIR=T + "/data", XDG_CONFIG_HOME=T + "/cfg")
p = subprocess.Popen([sys.executable, "-m", "punie_trio", "serve", "--stdio", "--project", T, *extra], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
p.stdin.write(b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":1}}\n'); p.stdin.flush()
out = p.stdout.read()
print("stdout", out[:80]); print("rc", p.wait(), p.stderr.read().decode()[-800:])
