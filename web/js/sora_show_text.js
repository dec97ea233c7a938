// Shows the text a node reports (its "text" UI output) on the node itself, in a read-only box below its widgets:
// the caption of Sora Prompt Expansion, the report of Sora Load LoRA (keys applied, keys that did not apply), what
// Sora Text Encode encoded and its notes (guessed concepts, cut prompts).
import { app } from "../../../scripts/app.js";  // served at /extensions/<pack>/js/

const NODES = ["SoraPromptExpansion", "SoraLoraLoader", "SoraTextEncode"];
const BOX = "expanded_prompt_shown";

app.registerExtension({
    name: "sora.ShowExpandedPrompt",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!NODES.includes(nodeData.name)) {
            return;
        }
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (output) {
            onExecuted?.apply(this, arguments);
            const text = (output?.text ?? []).join("\n\n");
            let box = this.widgets?.find((w) => w.name === BOX);
            if (!box) {
                // A DOM text area, not a ComfyUI widget type: it is never serialised into the workflow or
                // the API prompt, so the node's widgets_values keep their input order.
                const area = document.createElement("textarea");
                area.readOnly = true;
                area.style.cssText = "width:100%;min-height:80px;opacity:0.85;resize:vertical;";
                box = this.addDOMWidget(BOX, "sora_text", area, { serialize: false, getValue: () => area.value,
                                                                   setValue: (v) => { area.value = v; } });
                box.serialize = false;
            }
            box.element.value = text;
            this.setDirtyCanvas?.(true, true);
        };
    },
});
