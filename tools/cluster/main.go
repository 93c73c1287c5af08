// Command cwo-cluster is test tooling for celery-worker-operator: one multi-call binary holding
// etcd, kube-apiserver, kube-controller-manager and kubectl, so the link step is paid once.
//
//	cwo-cluster etcd|kube-apiserver|kube-controller-manager|kubectl [args...]
//
// or call it through a symlink named after the component (argv[0] dispatch), as
// scripts/cluster.sh lays out in .cluster/bin.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	_ "time/tzdata" // CronJob time zones, as the upstream mains do

	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format, as upstream
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics, as upstream
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric, as upstream
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

var components = []string{"etcd", "kube-apiserver", "kube-controller-manager", "kubectl"}

func main() {
	name := strings.TrimSuffix(filepath.Base(os.Args[0]), ".exe")
	args := os.Args[1:]
	if !known(name) {
		if len(args) == 0 || !known(args[0]) {
			fmt.Fprintf(os.Stderr, "usage: %s %s [args...]\n", name, strings.Join(components, "|"))
			os.Exit(2)
		}
		name, args = args[0], args[1:]
	}
	// Each component reads os.Args as if it were its own binary.
	os.Args = append([]string{name}, args...)
	switch name {
	case "etcd":
		etcdmain.Main(os.Args)
	case "kube-apiserver":
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "kube-controller-manager":
		os.Exit(cli.Run(controllermanager.NewControllerManagerCommand()))
	case "kubectl":
		logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args)) //nolint:errcheck
		if err := cli.RunNoErrOutput(kubectlcmd.NewDefaultKubectlCommand()); err != nil {
			kubectlutil.CheckErr(err)
		}
	}
}

func known(name string) bool {
	for _, component := range components {
		if component == name {
			return true
		}
	}
	return false
}
