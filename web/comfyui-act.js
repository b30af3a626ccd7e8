// What the pack adds to the ComfyUI page: the saved maps' path shown on Save Transport Maps, and error
// dialogs titled with the node's name as the user sees it rather than its internal id.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const OURS = /^ACT[A-Z]/;

// Registered when this file is imported, before the page adds its own error listener (which opens the
// dialog), so the dialog already reads the display name.
api.addEventListener("execution_error", ({ detail }) => {
  if (!detail || !OURS.test(detail.node_type ?? "")) return;
  const node = app.graph?.getNodeById?.(Number(detail.node_id)) ?? app.graph?.getNodeById?.(detail.node_id);
  const title = node?.title || globalThis.LiteGraph?.registered_node_types?.[detail.node_type]?.title;
  if (title) detail.node_type = title;
});

app.registerExtension({
  name: "ComfyUI-ACT.SavedPath",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "ACTSaveTransportMaps") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const text = output?.text?.[0];
      if (!text) return;
      let widget = this.widgets?.find((w) => w.name === "saved");
      if (!widget) {
        const box = document.createElement("textarea");
        box.readOnly = true;
        box.rows = 4;
        box.style.cssText = "width:100%;resize:none;font-size:11px;opacity:0.85";
        widget = this.addDOMWidget("saved", "act_saved", box, { serialize: false, getValue: () => box.value,
                                                               setValue: (v) => { box.value = v; } });
        widget.element = box;
      }
      widget.element.value = text;
      this.setSize([this.size[0], Math.max(this.size[1], this.computeSize()[1])]);
      app.graph.setDirtyCanvas(true, true);
    };
  },
});
