import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(d).eval()
tok = AutoTokenizer.from_pretrained(d)
text = open(sys.argv[2]).read()
ids = tok(text, add_special_tokens=False)["input_ids"]
print("tokens", len(ids), "first ids", ids[:8], "bytes", list(text.encode()[:8]))
x = torch.tensor([ids[:64]])
with torch.no_grad():
    out = model(x, labels=x)
# covey counts every position that has a next token: context 64 windows
print("loss on first 64-token window:", out.loss.item())
# Covey's packing: windows of 64 inputs, each position predicting the next token.
total, n = 0.0, 0
for start in range(0, len(ids) - 1, 64):
    inp = torch.tensor([ids[start:start + 64]])
    tgt = ids[start + 1:start + 65]
    with torch.no_grad():
        logits = model(inp).logits[0]
    lp = torch.log_softmax(logits[:len(tgt)], -1)
    total += -lp[torch.arange(len(tgt)), torch.tensor(tgt)].sum().item()
    n += len(tgt)
print("covey-style loss", total / n, "over", n, "targets")
